"""Predict unsafe outputs before generation, and guard generation at run time.

Chen et al. (Sec. 6) predict whether a model's answer will be harmful from the activations of
safety neurons at the prompt's last token, before any token is generated.
:class:`UnsafeOutputDetector` is that predictor: a logistic regression (standardised features) on
the chosen neurons' activations at the last token of the chat-rendered prompt. Labels come from
the model itself (:func:`unsafe_labels`): an answer is unsafe when the prompt is harmful and the
model's greedy answer is not a refusal (:func:`~safety_circuits.evaluate.is_refusal`).

:func:`monitor` turns a fitted detector into a runtime guard (the article's recommendation): TL
hooks read the same activations during the prompt's forward pass, score each prompt before its
first token is chosen, and can flag it, stop its answer, redirect it to a fixed message, or raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor

from safety_circuits._io import TableResult, load_tensors, save_tensors
from safety_circuits.activations import activations_at, check_prompts
from safety_circuits.architecture import Architecture
from safety_circuits.evaluate import generate, is_refusal
from safety_circuits.neurons import KINDS, NeuronSet, check_arch, check_expected, check_neurons

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

Action = Literal["flag", "stop", "redirect", "raise"]
ACTIONS: tuple[Action, ...] = ("flag", "stop", "redirect", "raise")
DEFAULT_MESSAGE = "I'm sorry, but I can't help with that."


# -- features and labels -------------------------------------------------------------------------
@torch.no_grad()
def prompt_activations(
    subject: Subject,
    prompts: Sequence[str],
    neurons: NeuronSet,
    *,
    batch_size: int = 8,
    chat: bool = True,
    system: str | None = None,
) -> Float[Tensor, "prompt neuron"]:
    """Activations of ``neurons`` (in ``NeuronSet`` order) at the last token of each rendered prompt."""
    prompts = check_prompts(prompts)
    check_neurons(neurons, subject)
    if not len(neurons):
        raise ValueError("the NeuronSet is empty: the detector needs at least one neuron")
    acts = activations_at(subject, prompts, neurons.hooks(), batch_size=batch_size, chat=chat, system=system)
    return neurons.gather({name: act[:, 0] for name, act in acts.items()})


def unsafe_labels(
    subject: Subject,
    prompts: Sequence[str],
    *,
    harmful: bool | Sequence[bool] = True,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> np.ndarray:
    """1 where the model's greedy answer is unsafe: a harmful prompt answered, not refused.

    ``harmful``: whether each prompt is harmful (one flag for all, or one per prompt); answers to
    harmless prompts are safe whatever they say.
    """
    prompts = check_prompts(prompts)
    flags = np.full(len(prompts), bool(harmful)) if isinstance(harmful, bool) else np.asarray(harmful, bool)
    if flags.shape != (len(prompts),):
        raise ValueError(f"harmful has {flags.size} flags for {len(prompts)} prompts")
    answers = generate(
        subject,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=False,
        **generate_kwargs,
    )
    answered = np.array([not is_refusal(a) for a in answers])
    return (flags & answered).astype(np.int64)


def _check_labels(labels: Any, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels has {y.size} entries for {n} prompts")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (safe) or 1 (unsafe)")
    return y.astype(np.int64)


def threshold_for_fpr(safe_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The lowest threshold that flags (score >= threshold) at most ``fpr`` of ``safe_scores``.

    >>> scores = [0.1, 0.2, 0.3, 0.4, 0.9]
    >>> t = threshold_for_fpr(scores, 0.2)
    >>> 0.4 < t < 0.41, sum(s >= t for s in scores)
    (True, 1)
    """
    scores = np.sort(np.asarray(safe_scores, dtype=np.float64))
    if not len(scores):
        raise ValueError("give at least one safe prompt's score")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    allowed = int(np.floor(fpr * len(scores) + 1e-9))
    return float(min(np.nextafter(scores[len(scores) - allowed - 1], np.inf), 1.0))


# -- evaluation ------------------------------------------------------------------------------------
@dataclass
class DetectorEval(TableResult):
    """Held-out predictions: ``frame`` (prompt, label, proba, predicted), AUROC and accuracy."""

    frame: pd.DataFrame
    threshold: float
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    @property
    def auroc(self) -> float:
        return float(roc_auc_score(self.frame["label"], self.frame["proba"]))

    @property
    def accuracy(self) -> float:
        return float((self.frame["predicted"] == self.frame["label"]).mean())

    def summary(self) -> dict[str, float]:
        return {
            "auroc": self.auroc,
            "accuracy": self.accuracy,
            "n": len(self.frame),
            "unsafe_share": float(self.frame["label"].mean()),
            "threshold": self.threshold,
        }

    def plot(self, title: str | None = None) -> go.Figure:
        """ROC curve with the chance diagonal."""
        fpr, tpr, _ = roc_curve(self.frame["label"], self.frame["proba"])
        fig = go.Figure(go.Scatter(x=fpr, y=tpr, mode="lines+markers", name="detector"))
        fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
        return fig.update_layout(
            title=title or f"unsafe-output detector: AUROC {self.auroc:.3f}, accuracy {self.accuracy:.3f}",
            xaxis_title="false positive rate",
            yaxis_title="true positive rate",
        )

    def __repr__(self) -> str:
        return f"DetectorEval(auroc={self.auroc:.3f}, accuracy={self.accuracy:.3f}, n={len(self.frame)})"


# -- the detector ----------------------------------------------------------------------------------
class UnsafeOutputDetector:
    """Logistic regression on neuron activations at the prompt's last token: P(unsafe answer).

    >>> detector = UnsafeOutputDetector(C=0.1)
    >>> detector.fitted
    False
    """

    def __init__(
        self,
        C: float = 1.0,
        threshold: float = 0.5,
        class_weight: Literal["balanced"] | None = "balanced",
        max_iter: int = 5000,
    ) -> None:
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.C, self.threshold, self.class_weight, self.max_iter = C, threshold, class_weight, max_iter
        self.neurons: NeuronSet | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: float = 0.0
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.config: dict[str, Any] = {}

    @property
    def fitted(self) -> bool:
        return self.coef_ is not None

    def _require_fit(self) -> NeuronSet:
        if self.neurons is None or self.coef_ is None:
            raise RuntimeError("the detector is not fitted: call fit(...) or load(...) first")
        return self.neurons

    # sklearn-style verbs -------------------------------------------------------------------------
    def fit(
        self,
        subject: Subject,
        prompts: Sequence[str],
        labels: Sequence[int] | np.ndarray | None,
        neurons: NeuronSet,
        *,
        harmful: bool | Sequence[bool] = True,
        max_new_tokens: int = 48,
        batch_size: int = 8,
        chat: bool = True,
    ) -> UnsafeOutputDetector:
        """Fit on ``prompts`` with ``labels`` (1 = unsafe answer); ``labels=None`` derives them from
        the model's own greedy answers (:func:`unsafe_labels` with ``harmful``)."""
        prompts = check_prompts(prompts)
        check_neurons(neurons, subject)
        if labels is None:
            labels = unsafe_labels(
                subject,
                prompts,
                harmful=harmful,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                chat=chat,
            )
        y = _check_labels(labels, len(prompts))
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"labels hold one class only ({'unsafe' if y[0] else 'safe'} for all {len(y)} prompts): "
                "the detector needs both safe and unsafe examples"
            )
        x = prompt_activations(subject, prompts, neurons, batch_size=batch_size, chat=chat)
        self.fit_features(x, y)
        self.neurons = neurons
        self.config = {
            "subject": subject.name,
            "n_prompts": len(prompts),
            "unsafe_share": float(y.mean()),
            "chat": chat,
            "neurons": len(neurons),
        }
        return self

    def fit_features(
        self, x: Float[Tensor, "prompt neuron"] | np.ndarray, y: np.ndarray
    ) -> UnsafeOutputDetector:
        """Fit the standardised logistic regression on ready-made features."""
        x = np.asarray(x, dtype=np.float64)
        y = _check_labels(y, len(x))
        self.mean_ = x.mean(0)
        self.scale_ = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
        model = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        model.fit((x - self.mean_) / self.scale_, y)
        self.coef_ = model.coef_[0].astype(np.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def proba_from_features(self, x: Float[Tensor, "prompt neuron"] | np.ndarray) -> np.ndarray:
        """P(unsafe) from features in ``self.neurons`` order."""
        self._require_fit()
        x = np.asarray(x, dtype=np.float64)
        logits = ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        return 1.0 / (1.0 + np.exp(-logits))

    def predict_proba(
        self, subject: Subject, prompts: Sequence[str], batch_size: int = 8, chat: bool | None = None
    ) -> np.ndarray:
        """P(unsafe answer) for each prompt, ``[n_prompts]``, before generating anything
        (``chat``: render with the chat template; default: as in :meth:`fit`)."""
        neurons = self._require_fit()
        chat = self.config.get("chat", True) if chat is None else chat
        return self.proba_from_features(
            prompt_activations(subject, prompts, neurons, batch_size=batch_size, chat=chat)
        )

    def predict(self, subject: Subject, prompts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """Whether each prompt is predicted to get an unsafe answer (P >= ``threshold``)."""
        return self.predict_proba(subject, prompts, batch_size) >= self.threshold

    def evaluate(
        self,
        subject: Subject,
        prompts: Sequence[str],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        harmful: bool | Sequence[bool] = True,
        max_new_tokens: int = 48,
        batch_size: int = 8,
    ) -> DetectorEval:
        """AUROC and accuracy on held-out ``prompts`` (labels derived as in :meth:`fit` if None)."""
        prompts = check_prompts(prompts)
        self._require_fit()
        if labels is None:
            labels = unsafe_labels(
                subject, prompts, harmful=harmful, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        y = _check_labels(labels, len(prompts))
        if len(np.unique(y)) < 2:
            raise ValueError("AUROC needs held-out prompts of both classes (safe and unsafe)")
        proba = self.predict_proba(subject, prompts, batch_size)
        frame = pd.DataFrame(
            {"prompt": prompts, "label": y, "proba": proba, "predicted": proba >= self.threshold}
        )
        frame["predicted"] = frame["predicted"].astype(np.int64)
        config = {"subject": subject.name, **self.config}
        return DetectorEval(frame, self.threshold, config=config, arch=subject.arch)

    def calibrate(
        self, subject: Subject, safe_prompts: Sequence[str], fpr: float = 0.05, batch_size: int = 8
    ) -> UnsafeOutputDetector:
        """Set ``threshold`` so that at most ``fpr`` of ``safe_prompts`` (validation prompts, e.g.
        the safe-but-alarming set's) are flagged; the calibration is kept in ``config`` and saved
        with the detector, so :func:`monitor` uses it."""
        proba = self.predict_proba(subject, check_prompts(safe_prompts), batch_size)
        self.threshold = threshold_for_fpr(proba, fpr)
        self.config["calibration"] = {
            "fpr": fpr,
            "n_prompts": len(proba),
            "flagged": float((proba >= self.threshold).mean()),
        }
        return self

    # files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted detector to ``.safetensors`` (weights, scaler, neuron masks) with its
        settings and the model fingerprint as JSON in the header. No pickle."""
        neurons = self._require_fit()
        tensors = {
            "coef": torch.from_numpy(self.coef_),  # type: ignore[arg-type]
            "mean": torch.from_numpy(self.mean_),  # type: ignore[arg-type]
            "scale": torch.from_numpy(self.scale_),  # type: ignore[arg-type]
            **{f"mask.{k}": m.to(torch.uint8) for k, m in neurons.masks(neurons.kinds()).items()},
        }
        header = {
            "arch": neurons.arch.fingerprint(),
            "neurons": {"name": neurons.name, "metadata": dict(neurons.metadata)},
            "intercept": self.intercept_,
            "C": self.C,
            "threshold": self.threshold,
            "class_weight": self.class_weight,
            "max_iter": self.max_iter,
            "config": self.config,
        }
        return save_tensors(path, tensors, "UnsafeOutputDetector", header)

    @classmethod
    def load(
        cls, path: str | os.PathLike, expect: Architecture | Subject | None = None
    ) -> UnsafeOutputDetector:
        """Read a file written by :meth:`save`; with ``expect``, check it fits that model."""
        path = Path(path)
        tensors, header = load_tensors(path, "UnsafeOutputDetector")
        try:
            arch = Architecture.from_dict(header["arch"])
            masks = {k: tensors[f"mask.{k}"].bool() for k in KINDS if f"mask.{k}" in tensors}
            neurons = NeuronSet.from_masks(
                arch, masks, name=header["neurons"]["name"], metadata=header["neurons"]["metadata"]
            )
            detector = cls(
                C=header["C"],
                threshold=header["threshold"],
                class_weight=header["class_weight"],
                max_iter=header["max_iter"],
            )
            detector.neurons = neurons
            detector.coef_ = tensors["coef"].numpy()
            detector.mean_ = tensors["mean"].numpy()
            detector.scale_ = tensors["scale"].numpy()
            detector.intercept_ = float(header["intercept"])
            detector.config = dict(header["config"])
            if len(detector.coef_) != len(neurons):
                raise ValueError(f"{len(detector.coef_)} weights for {len(neurons)} neurons")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid UnsafeOutputDetector file: {e}") from e
        check_expected(arch, expect, f"detector file {path.name}")
        return detector

    def __repr__(self) -> str:
        if not self.fitted:
            return f"UnsafeOutputDetector(C={self.C}, unfitted)"
        n = len(self._require_fit())
        return f"UnsafeOutputDetector(C={self.C}, {n} neurons, threshold={self.threshold})"


# -- runtime guard ---------------------------------------------------------------------------------
class UnsafePromptError(RuntimeError):
    """Raised by a ``monitor(..., action="raise")`` before the first token of a flagged prompt."""

    def __init__(self, probabilities: np.ndarray, threshold: float) -> None:
        self.probabilities = probabilities
        flagged = np.flatnonzero(probabilities >= threshold).tolist()
        super().__init__(
            f"unsafe output predicted for batch rows {flagged} "
            f"(P(unsafe) {np.round(probabilities[flagged], 3).tolist()} >= {threshold})"
        )


class Monitor:
    """State of an active :func:`monitor`: one event per prompt scored (``to_frame()``)."""

    def __init__(
        self, subject: Subject, detector: UnsafeOutputDetector, threshold: float, action: Action, message: str
    ):
        self.subject, self.detector, self.threshold, self.action = subject, detector, threshold, action
        self.message = message
        tok = subject.tokenizer
        self.forced = tok(message, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.events: list[dict[str, Any]] = []
        self._features: dict[str, Tensor] = {}
        self._neurons = detector._require_fit()
        self._calls = 0
        self._step = 0
        self._flagged: Tensor | None = None
        self._tokens: Tensor | None = None

    @property
    def flagged(self) -> list[bool]:
        return [e["flagged"] for e in self.events]

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt scored: forward call, batch row, the text read (special tokens
        dropped), P(unsafe), flagged, action."""
        return pd.DataFrame(self.events, columns=["call", "row", "text", "proba", "flagged", "action"])

    def _read_tokens(self, module: Any, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the embedding: the token ids of the current forward pass."""
        tokens = args[0] if args else None
        self._tokens = tokens if isinstance(tokens, Tensor) and tokens.ndim == 2 else None

    def _text(self, row: int) -> str:
        if self._tokens is None:
            return ""
        pad = self.subject.tokenizer.pad_token_id
        ids = [t for t in self._tokens[row].tolist() if t != pad]
        return self.subject.tokenizer.decode(ids, skip_special_tokens=True)

    def hooks(self) -> list[tuple[str, Any]]:
        capture = [(name, self._capture) for name in self._neurons.hooks()]
        return [*capture, ("unembed.hook_out", self._decide)]

    def _capture(self, act: Tensor, *, hook: Any) -> None:
        if act.shape[1] > 1:  # a prompt's forward pass (prefill); decoding steps read one token
            self._features[hook.name] = act[:, -1].clone()

    def _force(self, logits: Tensor, token: int) -> Tensor:
        rows = self._flagged
        logits[rows, -1] = torch.finfo(logits.dtype).min
        logits[rows, -1, token] = torch.finfo(logits.dtype).max
        return logits

    def _decide(self, logits: Tensor, *, hook: Any) -> Tensor | None:
        if logits.shape[1] == 1:  # a decoding step
            if self._flagged is None or not bool(self._flagged.any()):
                return None
            self._step += 1
            token = self.forced[min(self._step, len(self.forced) - 1)]
            return self._force(logits, token)
        if not self._features:
            return None
        features = self._neurons.gather(self._features).float().cpu()
        self._features = {}
        proba = self.detector.proba_from_features(features)
        flagged = proba >= self.threshold
        self._calls += 1
        for row, (p, f) in enumerate(zip(proba.tolist(), flagged.tolist(), strict=True)):
            event = {"call": self._calls, "row": row, "text": self._text(row), "proba": p, "flagged": f}
            self.events.append({**event, "action": self.action})
        if flagged.any():
            logger.warning(
                "monitor: %d of %d prompts flagged as likely unsafe", int(flagged.sum()), len(flagged)
            )
        self._flagged, self._step = torch.from_numpy(flagged).to(logits.device), 0
        if self.action == "raise" and flagged.any():
            raise UnsafePromptError(proba, self.threshold)
        if self.action == "flag" or not flagged.any():
            self._flagged = None
            return None
        first = self.forced[0] if self.action == "redirect" else self.forced[-1]
        if self.action == "stop":
            self._step = len(self.forced)
        return self._force(logits, first)


@contextmanager
def monitor(
    subject: Subject,
    detector: UnsafeOutputDetector,
    *,
    threshold: float | None = None,
    action: Action = "flag",
    message: str = DEFAULT_MESSAGE,
) -> Iterator[Monitor]:
    """Score every prompt ``subject.tl`` reads, before its first token is chosen.

    Inside the ``with`` block, any generation through ``subject.tl`` (e.g.
    :func:`~safety_circuits.evaluate.generate`, batched, KV-cached) is guarded: on each prompt's
    forward pass (more than one token), hooks read the detector's neurons at the last position and
    compute P(unsafe). Rows at or above ``threshold`` (default: the detector's) are

    - ``"flag"``: recorded only (``Monitor.to_frame()``, and a log warning);
    - ``"stop"``: ended at once: their first token is end-of-sequence (an empty answer);
    - ``"redirect"``: made to answer ``message`` (then end-of-sequence), token by token;
    - ``"raise"``: :class:`UnsafePromptError` is raised before any token is generated.

    Other rows of the batch generate as usual. Decoding steps are recognised by their single
    input token, so a one-token prompt is not scored.
    """
    detector._require_fit()
    check_arch(detector.neurons.arch, subject.arch, what="detector")  # type: ignore[union-attr]
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    state = Monitor(
        subject, detector, detector.threshold if threshold is None else threshold, action, message
    )
    handle = subject.tl.embed.register_forward_pre_hook(state._read_tokens)
    try:
        with subject.tl.hooks(fwd_hooks=state.hooks()):
            yield state
    finally:
        handle.remove()
