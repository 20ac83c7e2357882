"""DeiT's claim, tested on real data: a tiny ViT distilled from a convnet teacher scores higher on held-out
handwritten digits than the same ViT trained alone, same epochs, same seed.

The short version of bench/distill_digits.py (which docs/models.md quotes, with every setting tried): ~540 training
images of scikit-learn's digits, a RandomResizedCrop per image every epoch that the teacher sees too, a two-layer
convnet teacher trained here, petvit's own training step (train_one_epoch, DistillationLoss, TwoHeads).

What holds here is soft distillation. Hard distillation (DeiT's best on ImageNet, 300 epochs) scored below the
student alone in most settings tried on this data; the bench reports it, this test does not claim it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.distill_digits import Setting, load_digits_split, make_digits_tree, train_students, train_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_soft_distilled_tiny_vit_beats_the_same_vit_alone_on_real_digits(tmp_path: Path) -> None:
    setting = Setting(arch="twoconv")  # 30 epochs, lr 2e-3, 16 px, a 4 x 4 patch grid, crops down to 35 % area
    data = load_digits_split(make_digits_tree(tmp_path / "digits"), setting)
    assert (len(data.train_y), len(data.test_y)) == (540, 1078)  # petvit's seeded per-class split: 30 % trains

    teacher, teacher_top1 = train_teacher(data, setting)
    scores = train_students(data, setting, teacher, seed=0, modes=("soft",))
    print(
        f"\ndigits test top-1 ({len(data.test_y)} held-out images): two-conv teacher {teacher_top1:.4f}, "
        f"tiny ViT alone {scores['alone']:.4f}, tiny ViT distilled (soft) {scores['soft']:.4f}"
    )
    assert teacher_top1 >= 0.95  # a teacher worth learning from: the convnet's inductive bias at work
    # Seeds 0-3 in the bench: +18, +15, +10, +9 points (docs/models.md); 5 points leaves room for other CPUs' maths.
    assert scores["soft"] >= scores["alone"] + 0.05, scores
    assert scores["soft"] < teacher_top1  # the student approaches the teacher, it does not pass it here
