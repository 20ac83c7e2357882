"""Open set and calibration on real handwriting: a ViT that knows only the digits 0-4 (tests/conftest.py
open_set_digits), the digits 5-9 as "not a pet". Plus the measures themselves against their definitions, and
`petvit evaluate --ood-dir` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from cli.main import main
from tests.conftest import OpenSetDigits
from training.calibration import expected_calibration_error, fit_temperature, reliability_bins
from training.open_set import accepted_share, auroc, compare_scores, fit_class_gaussians, fpr_at_tpr, threshold_for


@pytest.mark.learning
def test_chosen_score_separates_unseen_digits_and_accepts_95_percent(open_set_digits: OpenSetDigits) -> None:
    d = open_set_digits
    table = compare_scores(d.fields["open_set"], d.fields["calibration"], d.test, d.unseen)
    report = {
        name: {k: round(row[k], 3) for k in ("auroc", "fpr_at_95_tpr", "in_accepted")} for name, row in table.items()
    }
    print(f"held-out 0-4 ({len(d.test.targets)}) vs 5-9 ({len(d.unseen.targets)}): {report}")
    open_set = d.fields["open_set"]
    chosen = open_set.score
    assert chosen == "mahalanobis" and table[chosen]["chosen"]
    # bench/open_set_digits.py over seeds and CPU kernel settings (docs/trust.md): the chosen score's AUROC vs digits
    # 5-9 was 0.850-0.919 and above both logit scores in every run (this seed: 0.896, 0.919 and 0.866 under the
    # native, avx2 and portable kernels), so 0.80 leaves room for another CPU's rounding.
    assert table[chosen]["auroc"] >= 0.80
    assert table[chosen]["auroc"] > max(table["msp"]["auroc"], table["energy"]["auroc"])
    # The threshold's mechanism, exactly: the smallest that accepts 95 % of the validation split it was set on.
    val_scores = open_set.scores(d.val.logits / d.fields["calibration"].temperature, d.val.features)[chosen].double()
    threshold = open_set.thresholds[chosen]
    assert accepted_share(val_scores, threshold) >= 0.95
    assert accepted_share(val_scores, threshold - 1e-9 * abs(threshold)) < 0.95
    # On 180 images never used for anything it accepts about as many: the bench's runs gave 0.872-0.972 (a 95 %
    # quantile of 180 validation images, then a share of 180 test images: about +-2.3 points each way).
    assert 0.85 <= table[chosen]["in_accepted"] <= 1.0


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(logits.double() / temperature, targets).item()


@pytest.mark.learning
def test_the_stored_temperature_minimises_the_nll_on_the_validation_split(open_set_digits: OpenSetDigits) -> None:
    """Temperature scaling's mechanism, exactly, on the trained model's own logits: whatever the training made of
    them (it moves with the CPU's rounding), the stored T is the NLL minimiser on the split it was fitted on, and the
    stored ECEs are that split's. Whether it also lowers the ECE on other images is an effect of the data: bench
    open_set_digits.py measures it over seeds and kernel settings (docs/trust.md)."""
    calibration, val = open_set_digits.fields["calibration"], open_set_digits.val
    assert calibration.split == "val" and calibration.num_images == len(val.targets) == 180
    t = calibration.temperature
    around = [nll(val.logits, val.targets, t * factor) for factor in torch.logspace(-1, 1, 81).tolist()]
    assert nll(val.logits, val.targets, t) <= min(around) + 1e-9  # the best of a 0.1x-10x grid about it
    for factor in (0.99, 1.01):  # and a true minimum, not a point on a slope the grid stepped over
        assert nll(val.logits, val.targets, t) < nll(val.logits, val.targets, t * factor)
    assert nll(val.logits, val.targets, t) <= nll(val.logits, val.targets, 1.0)  # never worse than leaving it be
    ece = expected_calibration_error
    assert calibration.ece_before == pytest.approx(ece(val.logits.softmax(-1), val.targets), abs=1e-6)
    assert calibration.ece_after == pytest.approx(ece((val.logits / t).softmax(-1), val.targets), abs=1e-6)


def test_a_temperature_fitted_on_one_split_calibrates_another() -> None:
    """The effect temperature scaling is for, where the truth is known: an over-confident copy (logits x 3) of a
    calibrated model, fitted on 3,000 images, measured on 3,000 others. No training, so no CPU's rounding decides it
    (measured: T 2.94, held-out ECE 0.300 -> 0.021; seeds 2 and 3: 0.284 -> 0.021, 0.304 -> 0.016)."""
    confident, labels = over_confident(6000, seed=1)
    t = fit_temperature(confident[:3000], labels[:3000])
    held_out, targets = confident[3000:], labels[3000:]
    before = expected_calibration_error(held_out.softmax(-1), targets)
    after = expected_calibration_error((held_out / t).softmax(-1), targets)
    print(f"T {t:.3f}; held-out ECE {before:.4f} -> {after:.4f}")
    assert before >= 0.2 and after <= 0.05 and after <= before / 5
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(held_out, targets, t) < nll(held_out, targets, 1.0)


def over_confident(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, 10) three times as confident as the softmax the labels were drawn from: a known temperature, 3."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, 10, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)  # calibrated by design
    return true_logits * 3.0, labels


def test_fit_temperature_recovers_a_known_temperature() -> None:
    assert fit_temperature(*over_confident(4000, seed=0)) == pytest.approx(3.0, rel=0.08)


def test_ece_follows_its_definition() -> None:
    # Four images at confidence 0.9 (three right) and four at 0.6 (two right): |0.75-0.9|/2 + |0.5-0.6|/2 = 0.125.
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    targets = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.125)
    rows = [r for r in reliability_bins(probs, targets) if r["count"]]
    assert [(r["count"], r["accuracy"]) for r in rows] == [(4, 0.5), (4, 0.75)]


def test_auroc_fpr_and_threshold_follow_their_definitions() -> None:
    rng = np.random.default_rng(0)
    inside, outside = torch.from_numpy(rng.normal(0, 1, 500)), torch.from_numpy(rng.normal(1.5, 1, 300))
    inside[:20] = outside[:20]  # ties count half
    expected = roc_auc_score(np.r_[np.zeros(500), np.ones(300)], np.r_[inside.numpy(), outside.numpy()])
    assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12)
    threshold = threshold_for(inside, 0.95)
    assert accepted_share(inside, threshold) >= 0.95 and accepted_share(inside, threshold - 1e-9) < 0.95
    assert fpr_at_tpr(inside, outside) == pytest.approx(float((outside <= threshold).double().mean()))


def test_class_gaussians_are_the_class_means_and_the_shared_covariance() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(3).repeat_interleave(400)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    mixing = torch.tensor([[1.0, 0.0], [0.8, 0.5]])  # covariance mixing^T mixing, shared by the classes
    features = centres[targets] + torch.randn(1200, 2, generator=generator) @ mixing
    means, precision = fit_class_gaussians(features, targets, 3, ridge=0.0)
    empirical = torch.stack([features[targets == c].mean(0) for c in range(3)])
    torch.testing.assert_close(means, empirical)
    centred = features - empirical[targets]  # each image minus its own class mean: one covariance for all
    torch.testing.assert_close(precision, torch.linalg.inv(centred.T @ centred / 1199), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(precision, torch.linalg.inv(mixing.T @ mixing), atol=0.3, rtol=0.15)  # near the truth


def write_pngs(images: torch.Tensor, folder: Path, names: list[str]) -> None:
    for image, name in zip(images, names, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)


@pytest.mark.learning
def test_evaluate_with_ood_dir_reports_every_score(open_set_digits: OpenSetDigits, tmp_path: Path, capsys) -> None:
    d = open_set_digits
    known, foreign, out = tmp_path / "digits", tmp_path / "not-pets", tmp_path / "report"
    labels = d.test.targets.tolist()
    write_pngs(d.test_images, known, [f"{label}/{i}.png" for i, label in enumerate(labels)])
    write_pngs(d.unseen_images[:60], foreign, [f"{i}.png" for i in range(60)])
    argv = ["evaluate", "--checkpoint", str(d.artifact), "--dataset", "folder", "--data-dir", str(known),
            "--output-dir", str(out), "--ood-dir", str(foreign)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibration (T 1." in printed and "mahalanobis *" in printed and "FPR@95" in printed

    report = json.loads((out / "report.json").read_text())
    ood = report["open_set"]
    assert ood["num_out"] == 60 and ood["num_in"] == report["num_images"]
    assert set(ood["scores"]) == {"msp", "energy", "mahalanobis"}
    for row in ood["scores"].values():
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["fpr_at_95_tpr"] <= 1.0
        assert row["threshold"] is not None and 0.0 <= row["in_accepted"] <= 1.0
    assert ood["scores"]["mahalanobis"]["chosen"] and ood["scores"]["mahalanobis"]["auroc"] > 0.7
    calibration = report["calibration"]
    assert calibration["temperature"] == pytest.approx(d.fields["calibration"].temperature)
    assert calibration["bins"] == 15 and 0 <= calibration["ece_after"] <= 1
    for png in ("open_set_scores.png", "reliability_diagram.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_evaluate_help_lists_ood_dir(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--ood-dir" in capsys.readouterr().out
