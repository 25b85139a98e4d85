"""safety_circuits: find, test and tune the safety neurons and refusal circuits of LLMs."""

from safety_circuits import data
from safety_circuits.data import advbench, harmbench, harmless
from safety_circuits.detect import find_foundation_neurons, find_safety_neurons, robust_safety_neurons
from safety_circuits.evaluate import attack_success_rate, generate, is_refusal, over_refusal_rate
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.loading import Architecture, Subject, UnsupportedArchitectureError, load_model
from safety_circuits.neurons import (
    KINDS,
    ArchitectureMismatchError,
    NeuronSet,
    ablate,
    ablate_hf,
    hf_masks,
    hf_slices,
    hook_name,
)
from safety_circuits.tuning import (
    Document,
    TuneConfig,
    TuneResult,
    refusal_documents,
    retain_documents,
    rsn_tune,
    sn_tune,
)

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Architecture",
    "ArchitectureMismatchError",
    "Document",
    "Importance",
    "NeuronSet",
    "Subject",
    "TuneConfig",
    "TuneResult",
    "UnsupportedArchitectureError",
    "ablate",
    "ablate_hf",
    "advbench",
    "attack_success_rate",
    "data",
    "find_foundation_neurons",
    "find_safety_neurons",
    "generate",
    "harmbench",
    "harmless",
    "hf_masks",
    "hf_slices",
    "hook_name",
    "is_refusal",
    "load_model",
    "neuron_importance",
    "over_refusal_rate",
    "refusal_documents",
    "retain_documents",
    "robust_safety_neurons",
    "rsn_tune",
    "sn_tune",
]
