"""A temperature fitted on too few validation images is refused (T = 1 kept) and `petvit train` says so, with the
minimum: a 3-image split once raised the ECE from 0.020 to 0.514 without a word."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.calibration import MIN_CALIBRATION_IMAGES, fit_calibration, fit_temperature, too_few_for_a_temperature
from training.loop import trust_fields
from training.open_set import Outputs

CLASSES = 5


def overconfident(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, CLASSES) right 70 % of the time but ~99 % sure: the fitted temperature is well above 1."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, CLASSES, (n,), generator=generator)
    wrong = torch.rand(n, generator=generator) < 0.3
    predicted = torch.where(wrong, (targets + 1) % CLASSES, targets)
    logits = torch.randn(n, CLASSES, generator=generator)
    logits[torch.arange(n), predicted] += 8.0
    return logits, targets


def test_below_the_minimum_the_temperature_is_refused_and_the_ece_unchanged():
    logits, targets = overconfident(MIN_CALIBRATION_IMAGES - 1)
    assert fit_temperature(logits, targets) > 2  # what would have been kept without the rule
    cal = fit_calibration(logits, targets)
    assert cal.temperature == 1.0 and cal.num_images == MIN_CALIBRATION_IMAGES - 1
    assert cal.ece_after == cal.ece_before


def test_from_the_minimum_on_the_temperature_is_fitted():
    logits, targets = overconfident(MIN_CALIBRATION_IMAGES)
    cal = fit_calibration(logits, targets)
    assert cal.temperature == pytest.approx(fit_temperature(logits, targets)) and cal.temperature > 2
    assert cal.ece_after < cal.ece_before


def test_the_refusal_states_the_split_size_and_the_minimum():
    assert too_few_for_a_temperature(MIN_CALIBRATION_IMAGES) is None
    reason = too_few_for_a_temperature(3)
    assert reason.startswith(
        f"calibration refused: the val split has 3 images, fewer than the {MIN_CALIBRATION_IMAGES}"
    )
    assert "--val-fraction" in reason


def job_with_val_split(num_val: int) -> SimpleNamespace:
    """What trust_fields reads of a TrainJob: the plan's outputs on train and val, and the labels."""
    train_logits, train_targets = overconfident(200, seed=1)
    val_logits, val_targets = overconfident(num_val, seed=2)
    features = torch.randn(200 + num_val, 8, generator=torch.Generator().manual_seed(3))
    outputs = (Outputs(train_logits, features[:200], train_targets), Outputs(val_logits, features[200:], val_targets))
    return SimpleNamespace(
        plan=SimpleNamespace(trust_outputs=lambda splits: outputs),
        splits=SimpleNamespace(labels=[str(c) for c in range(CLASSES)]),
    )


def test_train_warns_when_the_validation_split_is_too_small(capsys):
    fields = trust_fields(job_with_val_split(3))
    out = capsys.readouterr().out
    assert fields["calibration"].temperature == 1.0
    assert f"WARNING calibration refused: the val split has 3 images, fewer than the {MIN_CALIBRATION_IMAGES}" in out
    assert "calibration on val: temperature 1.000" in out


def test_train_is_quiet_about_a_split_large_enough(capsys):
    fields = trust_fields(job_with_val_split(MIN_CALIBRATION_IMAGES))
    assert fields["calibration"].temperature > 2 and "WARNING" not in capsys.readouterr().out
