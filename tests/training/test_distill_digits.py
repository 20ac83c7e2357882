"""DeiT's claim, tested on real data the way bench/distill_digits.py measured it holds: a tiny ViT distilled (soft)
from a convnet teacher scores higher on held-out handwritten digits than the same ViT trained alone, on average over
seeds. The bench's setting: ~540 training images of scikit-learn's digits (little data), petvit's own train
transform cropping each 8x8 original down to 35 % of its area every epoch (strong augmentation), a two-layer convnet
teacher that sees every augmented batch the student sees, and petvit's own training step (train_one_epoch,
DistillationLoss, TwoHeads).

What is not asserted, because the bench says it does not hold reliably: hard distillation beating the ViT alone
(its sign flips with the seed and with the CPU's rounding; docs/models.md has the table over seeds and kernels).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from bench.distill_digits import (
    AugmentedBatches,
    Digits,
    Setting,
    build_student,
    build_teacher,
    fit,
    load_digits_split,
    make_digits_tree,
    train_students,
    train_teacher,
)
from training.distill import DistillationLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = (0, 1, 2)
# Soft minus alone, mean over SEEDS. bench/kernels.py distill_digits (docs/models.md) runs exactly this test's
# computations for seeds 0-2 under each kernel setting: per-run gains +7.4 to +31.8 points, means over the three
# seeds +17.7 (native AVX512), +22.4 (avx2), +14.1 (default); one seed can come near the margin, a mean of three
# has not. Hard distillation (13 of 15 runs above alone, -7.5 to +16.3 points) is reported there, not asserted.
MARGIN = 0.05


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    data = load_digits_split(make_digits_tree(tmp_path_factory.mktemp("digits")), Setting())
    assert (len(data.train_y), len(data.test_y)) == (540, 1078)  # petvit's seeded per-class split: 30 % trains
    return data


def test_the_teacher_sees_exactly_the_augmented_batch_the_student_trains_on(digits: Digits) -> None:
    """The mechanism the comparison rests on (DeiT): every step, the teacher's input is the student's input, the
    freshly cropped batch, not the stored image; and the crops are new every epoch."""
    setting = replace(Setting(), epochs=2)
    teacher = build_teacher(setting).eval().requires_grad_(False)
    student = build_student(setting, distilled=True)
    shown_teacher: list[torch.Tensor] = []
    shown_student: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda module, args: shown_teacher.append(args[0].clone()))
    forward_train = student.forward_train
    student.forward_train = lambda x: (shown_student.append(x.clone()), forward_train(x))[1]  # record, then train
    fit(student, digits, setting, seed=0, distillation=DistillationLoss(teacher, "soft"))

    steps = len(digits.train_y) // setting.batch_size  # the last partial batch dropped
    assert len(shown_student) == len(shown_teacher) == 2 * steps
    for seen_by_teacher, seen_by_student in zip(shown_teacher, shown_student, strict=True):
        assert torch.equal(seen_by_teacher, seen_by_student)
    assert shown_student[0].shape == (setting.batch_size, 3, setting.image_size, setting.image_size)
    # The same seed draws the same batches again: an independent AugmentedBatches reproduces epoch 1 exactly.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    again = [images for images, _ in AugmentedBatches(digits.train_x, digits.train_y, setting, generator)]
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(again, shown_student[:steps], strict=True))
    # Augmented: a second epoch crops the same images differently.
    assert not torch.equal(shown_student[0], shown_student[steps])


@pytest.mark.learning
def test_soft_distillation_lifts_a_tiny_vit_on_real_digits_over_seeds(digits: Digits) -> None:
    setting = Setting()  # two-conv teacher; 30 epochs, lr 2e-3, 16 px, a 4 x 4 patch grid, crops down to 35 %
    teacher, teacher_top1 = train_teacher(digits, setting)
    runs = [train_students(digits, setting, teacher, seed, modes=("soft",)) for seed in SEEDS]
    gains = [r["soft"] - r["alone"] for r in runs]
    print(f"\ndigits, {len(digits.test_y)} held-out images: teacher {teacher_top1:.4f}; per seed {SEEDS}: "
          + "; ".join(f"alone {r['alone']:.4f} soft {r['soft']:.4f}" for r in runs))  # fmt: skip
    assert teacher_top1 >= 0.95  # a teacher worth learning from: the convnet's inductive bias at work
    assert statistics.fmean(gains) >= MARGIN, gains
    assert all(r["soft"] < teacher_top1 for r in runs)  # the student approaches its teacher, no further
