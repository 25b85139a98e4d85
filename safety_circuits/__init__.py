"""safety_circuits: find, test and tune the safety neurons and refusal circuits of LLMs."""

from safety_circuits import data, judge, stats
from safety_circuits.architecture import Architecture, UnsupportedArchitectureError
from safety_circuits.circuit import RefusalCircuit, map_refusal_circuit
from safety_circuits.contrast import ContrastScores, alignment_tax, contrast_activations
from safety_circuits.data import Suite, advbench, harmbench, harmless, suite
from safety_circuits.detect import find_foundation_neurons, find_safety_neurons, robust_safety_neurons
from safety_circuits.direction import RefusalDirection, find_refusal_direction, orthogonalize_weights
from safety_circuits.evaluate import (
    SuiteEval,
    attack_success_rate,
    evaluate_suites,
    generate,
    is_refusal,
    over_refusal_rate,
)
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.judge import RefusalClassifier
from safety_circuits.loading import Subject, load_model
from safety_circuits.monitor import UnsafeOutputDetector, monitor
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
from safety_circuits.patching import dynamic_patching, patching_curve
from safety_circuits.probing import probe_layers, probe_neurons
from safety_circuits.tracing import RefusalMetric, trace_components
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
    "ContrastScores",
    "Document",
    "Importance",
    "NeuronSet",
    "RefusalCircuit",
    "RefusalClassifier",
    "RefusalDirection",
    "RefusalMetric",
    "Subject",
    "Suite",
    "SuiteEval",
    "TuneConfig",
    "TuneResult",
    "UnsafeOutputDetector",
    "UnsupportedArchitectureError",
    "ablate",
    "ablate_hf",
    "advbench",
    "alignment_tax",
    "attack_success_rate",
    "contrast_activations",
    "data",
    "dynamic_patching",
    "evaluate_suites",
    "find_foundation_neurons",
    "find_refusal_direction",
    "find_safety_neurons",
    "generate",
    "harmbench",
    "harmless",
    "hf_masks",
    "hf_slices",
    "hook_name",
    "is_refusal",
    "judge",
    "load_model",
    "map_refusal_circuit",
    "monitor",
    "neuron_importance",
    "orthogonalize_weights",
    "over_refusal_rate",
    "patching_curve",
    "probe_layers",
    "probe_neurons",
    "refusal_documents",
    "retain_documents",
    "robust_safety_neurons",
    "rsn_tune",
    "sn_tune",
    "stats",
    "suite",
    "trace_components",
]
