"""What an artifact stores so that its answers can be trusted, and how the service applies it.

Calibration: one temperature T, fitted after training on the validation split (training/calibration.py). The
calibrated probabilities are softmax(logits / T) (Guo et al. 2017); T > 1 softens an over-confident network. The
temperature never changes which class is on top, only how sure the scores say the model is.

Open set ("no pet recognised"): a score per image that grows the less the image looks like the classes the model
was trained on, and a threshold above which the image is called `unknown`. Three scores, all "higher = more
unusual", so one comparison rule serves them all:

    msp          -max softmax probability (Hendrycks & Gimpel 2017), of the calibrated logits
    energy       -logsumexp(calibrated logits): the free energy of Liu et al. 2020
    mahalanobis  squared Mahalanobis distance of the CLS feature (after the final LayerNorm, before the head) to
                 the nearest class mean, under one covariance shared by the classes (Lee et al. 2018); the class
                 means and the shared precision matrix are fitted on the training split

The thresholds are chosen on the validation split (training/open_set.py) so that a target share of in-distribution
images (default 95 %) is accepted. Which score decides is chosen by measurement: docs/trust.md has the numbers.

A distilled ViT has two special tokens; its feature here is the CLS token alone, the one its label-trained head
reads (the distillation token learns the teacher's answers, which need not follow the labels' classes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

SCORES = ("msp", "energy", "mahalanobis")
DEFAULT_SCORE = "mahalanobis"  # the strongest on every measurement so far (docs/trust.md)
DEFAULT_ACCEPTANCE = 0.95
ECE_BINS = 15
# The open-set tensors are stored in the artifact's safetensors file beside the weights, under this prefix.
TENSOR_PREFIX = "open_set."
CLASS_MEANS, PRECISION = "class_means", "precision"


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) calibrated logits -> (B,) minus the top softmax probability."""
    return -logits.float().softmax(dim=-1).amax(dim=-1)


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) calibrated logits -> (B,) free energy -logsumexp (Liu et al. 2020, at their T = 1)."""
    return -torch.logsumexp(logits.float(), dim=-1)


def whitening(means: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cholesky factor L of the precision, precision = L L^T (D, D), the class means whitened by it (C, D)), in
    float64: what mahalanobis_score needs, computed once per artifact."""
    factor = torch.linalg.cholesky(precision.double())  # (D, D)
    return factor, means.double() @ factor  # (C, D) @ (D, D) -> (C, D)


def mahalanobis_score(
    features: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    whitened: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, D) features -> (B,) squared Mahalanobis distance to the nearest of the (C, D) class means under the
    (D, D) precision matrix (`whitened`: their whitening(), when already computed)."""
    # Whiten with the Cholesky factor, then plain distances: B x C x D work, not B x C x D^2, and no
    # |f|^2 - 2 f.mu + |mu|^2 expansion to lose digits to cancellation.
    factor, centres = whitened or whitening(means, precision)
    z = features.double() @ factor  # (B, D) @ (D, D) -> (B, D)
    distances = (z[:, None, :] - centres[None, :, :]).square().sum(dim=-1)  # (B, 1, D) - (1, C, D) -> (B, C)
    return distances.amin(dim=-1).float()


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling: probabilities are softmax(logits / temperature). ECEs are on the split it was fitted
    on (the validation split), before and after, with ECE_BINS equal-width confidence bins."""

    temperature: float
    ece_before: float | None = None
    ece_after: float | None = None
    split: str = "val"
    num_images: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"a temperature must be a positive finite number, got {self.temperature!r}")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Calibration:
        known = {k: doc[k] for k in ("ece_before", "ece_after", "split", "num_images") if k in doc}
        return cls(temperature=float(doc["temperature"]), **known)

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "bins": ECE_BINS,
            "split": self.split,
            "num_images": self.num_images,
        }


@dataclass(frozen=True)
class OpenSet:
    """How to tell that an image is none of the classes: the deciding score, a threshold per score (an image whose
    score is above the deciding one's threshold is unknown), and the tensors the Mahalanobis score needs.

    `tensors` ({CLASS_MEANS: (C, D), PRECISION: (D, D)}) travel in the safetensors file, not in the JSON header;
    model.artifact.load_artifact fills them in, read_metadata (header only) leaves them empty."""

    score: str = DEFAULT_SCORE
    thresholds: dict[str, float] = field(default_factory=dict)  # score name -> threshold on the validation split
    target_acceptance: float = DEFAULT_ACCEPTANCE
    feature: str = "cls"  # the token the Mahalanobis score reads (see the module docstring for distilled models)
    fitted: dict[str, Any] = field(default_factory=dict)  # where each part was fitted, and on how many images
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"open-set score must be one of {SCORES}, got {self.score!r}")
        if not 0.0 < self.target_acceptance <= 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1], got {self.target_acceptance}")
        unknown = set(self.thresholds) - set(SCORES)
        if unknown:
            raise ValueError(f"thresholds for unknown scores {sorted(unknown)}; the scores are {SCORES}")

    @property
    def threshold(self) -> float | None:
        """The deciding score's threshold (None: this artifact has a score but no threshold for it)."""
        return self.thresholds.get(self.score)

    @property
    def needs_features(self) -> bool:
        """Whether the deciding score reads the CLS feature (and not only the logits)."""
        return self.score == "mahalanobis"

    @property
    def has_mahalanobis(self) -> bool:
        return CLASS_MEANS in self.tensors and PRECISION in self.tensors

    def scores(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every score this open set can compute: {name: (B,)}. `logits` are calibrated (divided by the
        temperature); the Mahalanobis score needs the (B, D) CLS features and the fitted tensors."""
        out = {"msp": msp_score(logits), "energy": energy_score(logits)}
        if features is not None and self.has_mahalanobis:
            out["mahalanobis"] = self._mahalanobis(features)
        return out

    def deciding_score(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores of the deciding score."""
        if self.score == "msp":
            return msp_score(logits)
        if self.score == "energy":
            return energy_score(logits)
        if features is None or not self.has_mahalanobis:
            raise ValueError("the Mahalanobis score needs the CLS features and the artifact's class means")
        return self._mahalanobis(features)

    def _mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis_score(features, self.tensors[CLASS_MEANS], self.tensors[PRECISION], self._whitened)

    @cached_property
    def _whitened(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Once per OpenSet (a frozen dataclass: cached_property writes the instance's __dict__ directly).
        return whitening(self.tensors[CLASS_MEANS], self.tensors[PRECISION])

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> OpenSet:
        return cls(
            score=str(doc.get("score", DEFAULT_SCORE)),
            thresholds={str(k): float(v) for k, v in dict(doc.get("thresholds") or {}).items()},
            target_acceptance=float(doc.get("target_acceptance", DEFAULT_ACCEPTANCE)),
            feature=str(doc.get("feature", "cls")),
            fitted=dict(doc.get("fitted") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "thresholds": dict(self.thresholds),
            "target_acceptance": self.target_acceptance,
            "feature": self.feature,
            "fitted": dict(self.fitted),
            "tensors": sorted(TENSOR_PREFIX + name for name in self.tensors),
        }

    def check_tensors(self, source: str) -> None:
        """A Mahalanobis open set must carry its class means and precision matrix, of matching shapes."""
        if self.score != "mahalanobis" and not self.tensors:
            return
        if not self.has_mahalanobis:
            raise ValueError(f"{source}: the open-set score is {self.score} but the file lacks its class means")
        means, precision = self.tensors[CLASS_MEANS], self.tensors[PRECISION]
        d = means.shape[-1]
        if means.ndim != 2 or tuple(precision.shape) != (d, d):
            raise ValueError(
                f"{source}: open-set class means {tuple(means.shape)} and precision {tuple(precision.shape)} "
                "do not fit together"
            )


def calibrated(logits: torch.Tensor, calibration: Calibration | None) -> torch.Tensor:
    """Logits divided by the artifact's temperature (unchanged without one)."""
    return logits if calibration is None else logits / calibration.temperature


__all__ = [
    "CLASS_MEANS",
    "DEFAULT_ACCEPTANCE",
    "DEFAULT_SCORE",
    "ECE_BINS",
    "PRECISION",
    "SCORES",
    "TENSOR_PREFIX",
    "Calibration",
    "OpenSet",
    "calibrated",
    "energy_score",
    "mahalanobis_score",
    "msp_score",
    "whitening",
]
