"""`petvit train --recipe distill` and `--recipe teacher`: DeiT's loss by hand, the teacher on the mixed batch,
both recipes end to end, resume (and its refusal with another teacher), DDP, and the flags' contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli.main import main
from model.artifact import file_sha256, load_artifact, read_metadata, read_metadata_document, save_artifact
from model.convert.teachers import load_convnet_artifact
from tests.conftest import make_tiny_model
from training.distill import DistillationLoss, TwoHeads
from training.epoch import LRSchedule, Optimization, Runtime, train_one_epoch
from training.recipes import recipe_config

TINY_VIT = ["--set", "image_size=32", "--set", "patch_size=8", "--set", "hidden_dim=32", "--set", "depth=1",
            "--set", "num_heads=2", "--set", "mlp_dim=64"]  # fmt: skip
QUIET = ["--workers", "0", "--threads", "1", "--no-download", "--dtype", "fp32"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vit_teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different tiny 37-class ViT artifacts with the Pet labels: teachers the fixture's classes fit."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (1, 2):
        path = folder / f"vit-teacher-{seed}.safetensors"
        save_artifact(make_tiny_model(seed), path, {"name": f"t{seed}", "variant": "tiny", "evaluation": {"top1": 0.4}})
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------- the loss
class FixedTeacher(nn.Module):
    """Answers given logits whatever the images; records the images it was shown."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.seen = logits, []
        self.norm = nn.BatchNorm1d(1)  # running statistics that must stay put: the teacher is in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        self.norm(images.float().mean(dim=(1, 2, 3))[:, None])  # (B, 1)
        return self.logits[: images.shape[0]]


class FixedStudent(nn.Module):
    def __init__(self, cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> None:
        super().__init__()
        self.cls_logits, self.dist_logits = nn.Parameter(cls_logits.clone()), nn.Parameter(dist_logits.clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_logits, self.dist_logits


def logits_for_the_loss() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cls_logits, dist_logits, teacher = (torch.randn(4, 5, generator=gen) * 2 for _ in range(3))
    return cls_logits, dist_logits, teacher, torch.tensor([0, 1, 2, 3])


def test_hard_distillation_is_half_the_labels_half_the_teachers_argmax() -> None:
    cls_logits, dist_logits, teacher_logits, y = logits_for_the_loss()
    teacher = FixedTeacher(teacher_logits).eval()
    loss, logits = DistillationLoss(teacher, "hard")(FixedStudent(cls_logits, dist_logits), torch.rand(4, 3, 8, 8), y)
    teacher_labels = teacher_logits.argmax(dim=1)
    assert not torch.equal(teacher_labels, y)  # the two terms teach different things here
    expected = 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, teacher_labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)  # accuracy counts what inference answers


def test_soft_distillation_is_tempered_kl_weighted_by_alpha() -> None:
    cls_logits, dist_logits, teacher_logits, y = logits_for_the_loss()
    teacher = FixedTeacher(teacher_logits).eval()
    student = FixedStudent(cls_logits, dist_logits)
    loss, _ = DistillationLoss(teacher, "soft", alpha=0.3, tau=3.0)(student, torch.rand(4, 3, 8, 8), y, 0.1)
    p_teacher = (teacher_logits / 3).softmax(dim=1)
    kl = (p_teacher * (p_teacher.log() - (dist_logits / 3).log_softmax(dim=1))).sum(dim=1).mean()  # per image
    expected = 0.7 * F.cross_entropy(cls_logits, y, label_smoothing=0.1) + 0.3 * 9.0 * kl
    torch.testing.assert_close(loss, expected)


def test_the_teacher_gets_no_gradient_and_keeps_its_statistics() -> None:
    cls_logits, dist_logits, teacher_logits, y = logits_for_the_loss()
    teacher = FixedTeacher(nn.Parameter(teacher_logits)).eval()
    before = teacher.norm.running_mean.clone()
    student = FixedStudent(cls_logits, dist_logits)
    loss, _ = DistillationLoss(teacher, "soft")(student, torch.rand(4, 3, 8, 8), y)
    loss.backward()
    assert teacher.logits.grad is None and student.dist_logits.grad.abs().sum() > 0
    assert torch.equal(teacher.norm.running_mean, before)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"mode": "warm"}, "distill must be one of"), ({"alpha": 1.5}, "alpha must be in"), ({"tau": 0}, "tau")],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationLoss(nn.Identity(), **settings)


def test_the_teacher_sees_the_mixed_batch_the_student_sees() -> None:
    """DeiT feeds the teacher the MixUp/CutMix images, so its answer is about the image the student saw."""
    torch.manual_seed(0)
    student = make_tiny_model(distilled=True).train()
    teacher = FixedTeacher(torch.randn(8, 37)).eval()
    step, shown = TwoHeads(student), []
    step.register_forward_pre_hook(lambda module, args: shown.append(args[0].clone()))

    def mixer(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = 0.7 * images.float() / 255 + 0.3 * images.flip(0).float() / 255
        return mixed, 0.7 * F.one_hot(targets, 37).float() + 0.3 * F.one_hot(targets.flip(0), 37).float()

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    opt = Optimization(optimizer, LRSchedule(1e-3, 1e-3, 1, 0), 0.1, 1.0, mixer, DistillationLoss(teacher))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    _, stats = train_one_epoch(step, [(images, torch.arange(8))], opt, 0, Runtime(torch.device("cpu")))
    assert len(teacher.seen) == 1 and len(shown) == 1
    assert torch.equal(teacher.seen[0], shown[0]) and shown[0].dtype == torch.float32  # the mixed images, both
    assert not torch.equal(shown[0], images.float() / 255)
    assert stats["seen"] == 8 and stats["loss_sum"] > 0


# ---------------------------------------------------------------------------------------------- end to end
def test_teacher_recipe_writes_a_convnet_teacher_artifact(pets_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher.safetensors"
    argv = ["train", "--recipe", "teacher", "--arch", "resnet18", "--init", "random", "--set", "image_size=32",
            "--dataset", "pets", "--data-dir", str(pets_root), "--out", str(out), "--output-dir", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "16", *QUIET]  # fmt: skip
    assert main(argv) == 0
    doc = read_metadata_document(out)
    assert doc["architecture"] == {"kind": "torchvision", "name": "resnet18", "num_classes": 37}
    assert doc["name"] == "petvit-resnet18-teacher-pets" and doc["trained"] is True
    assert doc["training"]["recipe"] == "teacher" and doc["training"]["config"]["arch"] == "resnet18"
    assert doc["evaluation"]["num_images"] == 74 and 0.0 <= doc["evaluation"]["top1"] <= 1.0
    model, _ = load_convnet_artifact(out)
    assert model.image_size == 32 and model.net.fc.out_features == 37
    assert main(["predict", "--checkpoint", str(out), str(tmp_path)]) == 2  # the ViT commands refuse it, politely


def test_teacher_from_imagenet_offline_says_where_to_put_the_weights(
    pets_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import urllib.error

    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    argv = ["train", "--recipe", "teacher", "--arch", "resnet18", "--dataset", "pets", "--data-dir", str(pets_root),
            "--out", str(tmp_path / "t.safetensors"), "--output-dir", str(tmp_path / "run"), *QUIET]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert Path(ResNet18_Weights.DEFAULT.url).name in err
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints") in err
    assert "--init random needs no pretrained weights" in err and "Traceback" not in err


def test_distill_recipe_end_to_end_records_the_teacher(pets_root: Path, vit_teachers, tmp_path: Path) -> None:
    teacher = vit_teachers[0]
    out, run = tmp_path / "student.safetensors", tmp_path / "run"
    argv = ["train", "--recipe", "distill", "--teacher", str(teacher), "--dataset", "pets", "--data-dir",
            str(pets_root), "--out", str(out), "--output-dir", str(run), "--epochs", "2", "--batch-size", "16",
            "--distill", "soft", "--distill-tau", "2", "--distill-alpha", "0.4", *TINY_VIT, *QUIET]  # fmt: skip
    assert main(argv) == 0
    model, meta = load_artifact(out)
    assert meta.config.distilled is True and model.head_dist is not None and meta.variant == "ti16"
    training = meta.training
    assert training["recipe"] == "distill" and len(training["history"]) == 2
    assert training["teacher"] == {"path": str(teacher), "sha256": file_sha256(teacher), "arch": "vit-tiny",
                                   "test_top1": 0.4}  # fmt: skip
    assert training["distillation"] == {"distill": "soft", "distill_alpha": 0.4, "distill_tau": 2.0}
    assert meta.evaluation["num_images"] == 74
    # The held-out score is the averaged heads', the one the service will serve.
    log = json.loads((run / "log.json").read_text())
    assert log["train"]["teacher"] == str(teacher) and 0.0 <= log["epochs"][-1]["val_top1"] <= 1.0


def test_distill_resumes_where_it_stopped_and_refuses_another_teacher(
    pets_root: Path, vit_teachers, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, second = vit_teachers
    common = ["train", "--recipe", "distill", "--dataset", "pets", "--data-dir", str(pets_root), "--epochs", "2",
              "--batch-size", "16", "--augment", "trivial", "--mixup", "--seed", "5", "--no-evaluate",
              *TINY_VIT, *QUIET]  # fmt: skip
    straight = tmp_path / "straight.safetensors"
    assert main([*common, "--teacher", str(first), "--out", str(straight), "--output-dir", str(tmp_path / "a")]) == 0

    resumed, run = tmp_path / "resumed.safetensors", tmp_path / "b"
    assert main([*common, "--teacher", str(first), "--out", str(resumed), "--output-dir", str(run), "--stop-after",
                 "1"]) == 0  # fmt: skip
    assert main([*common, "--teacher", str(second), "--out", str(resumed), "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "teacher_sha256" in err and file_sha256(first) in err and file_sha256(second) in err
    assert main([*common, "--teacher", str(first), "--out", str(resumed), "--output-dir", str(run), "--resume"]) == 0
    a, b = load_artifact(straight)[0].state_dict(), load_artifact(resumed)[0].state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.usefixtures("torchrun_env")
def test_distill_trains_under_a_torchrun_style_process_group(pets_root: Path, vit_teachers, tmp_path: Path) -> None:
    """DDP wraps the two-headed student (not the teacher): a 1-process gloo group as torchrun sets it up."""
    out, run = tmp_path / "ddp.safetensors", tmp_path / "run"
    argv = ["train", "--recipe", "distill", "--teacher", str(vit_teachers[0]), "--dataset", "pets", "--data-dir",
            str(pets_root), "--out", str(out), "--output-dir", str(run), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--no-evaluate", *TINY_VIT, *QUIET]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "log.json").read_text())["distributed"] is True
    assert read_metadata(out).config.distilled is True


def test_a_teacher_of_other_classes_is_refused(pets_root: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "ten.safetensors"
    save_artifact(make_tiny_model(num_classes=10), other, {"name": "ten"})
    argv = ["train", "--recipe", "distill", "--teacher", str(other), "--dataset", "pets", "--data-dir",
            str(pets_root), "--out", str(tmp_path / "a.safetensors"), "--output-dir", str(tmp_path / "run"),
            "--epochs", "1", *TINY_VIT, *QUIET]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the teacher" in err and "(10)" in err and "(37)" in err and "same dataset" in err


@pytest.mark.parametrize(
    ("recipe", "settings", "message"),
    [
        ("distill", {}, "--recipe distill needs --teacher ARTIFACT"),
        ("scratch", {"teacher": "t.safetensors"}, "--teacher applies to --recipe distill only"),
        ("scratch", {"arch": "resnet18"}, "--arch applies to --recipe teacher only"),
        ("teacher", {"arch": "vit_b_16"}, "unknown convnet 'vit_b_16'"),
        ("teacher", {"model_overrides": {"depth": 2}}, "takes only --set image_size=N"),
    ],
)
def test_recipe_settings_are_checked_before_any_work(recipe: str, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recipe_config(recipe, **settings)


def test_distill_defaults_follow_deit() -> None:
    cfg = recipe_config("distill", teacher="t.safetensors")
    assert (cfg.variant, cfg.distill, cfg.distill_alpha, cfg.distill_tau, cfg.mixup) == ("ti16", "hard", 0.5, 3.0, True)
    teacher = recipe_config("teacher")
    assert (teacher.arch, teacher.init, teacher.mixup) == ("resnet50", "imagenet", False)


def test_train_help_lists_the_recipes_and_their_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for word in ("distill", "teacher", "--teacher", "--arch", "--distill-tau", "--distill-alpha", "--init"):
        assert word in out, word
