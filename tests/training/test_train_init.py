"""`petvit train --init ARTIFACT`: a finetune or linear probe that starts from an imported checkpoint's backbone, with
a new head for the data's classes, under the imported preprocessing; refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.main import main as petvit
from model.artifact import Preprocessing, file_sha256, load_artifact, read_metadata
from model.config import get_config
from tests.hub_checkpoints import hf_deit, hf_vit
from training.data import eval_transform, load_splits
from training.recipes import recipe_config

QUIET = ["--workers", "0", "--threads", "1", "--no-download"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def imported_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class transformers ViT (64 px, squash, mean/std 0.5), imported."""
    root = tmp_path_factory.mktemp("imported")
    hf_vit(root / "published", labels=["alpha", "beta", "gamma"])
    out = root / "vit.safetensors"
    assert petvit(["import", str(root / "published"), "--out", str(out)]) == 0
    return out


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}


def test_finetune_starts_from_the_imported_backbone_with_a_new_head(
    imported_vit: Path, pets_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pets.safetensors"
    # lr 0: nothing moves, so the trained artifact shows exactly what the run started from.
    args = ["train", "--recipe", "finetune", "--init", str(imported_vit), "--data-dir", str(pets_root), "--epochs",
            "1", "--batch-size", "32", "--lr", "0", "--augment", "light", "--out", str(out), *QUIET]  # fmt: skip
    assert petvit(args) == 0
    start, start_meta = load_artifact(imported_vit)
    trained, meta = load_artifact(out)
    assert meta.config == start_meta.config.replace(num_classes=37)  # the imported architecture, eps 1e-12 included
    assert meta.labels[0] == "Abyssinian" and len(meta.labels) == 37  # the data's classes, not the checkpoint's
    for name, tensor in backbone(start.state_dict()).items():
        assert torch.equal(trained.state_dict()[name], tensor), name
    assert torch.count_nonzero(trained.head.weight) == 0  # the new head, zero-initialised
    assert meta.preprocessing == start_meta.preprocessing  # squash to 64, mean/std 0.5: the imported policy
    assert meta.preprocessing.resize_mode == "squash"
    assert meta.training["init"]["sha256"] == file_sha256(imported_vit)
    assert meta.variant == "custom" and "top1" in meta.evaluation


def test_linear_probe_of_an_imported_deit_answers_as_it_was_scored(pets_root: Path, tmp_path: Path) -> None:
    """A distilled backbone's probe trains one head on (cls + dist) / 2; the artifact must answer exactly that."""
    hf_deit(tmp_path / "published", with_teacher=True)
    start = tmp_path / "deit.safetensors"
    assert petvit(["import", str(tmp_path / "published"), "--out", str(start)]) == 0
    out = tmp_path / "probe.safetensors"
    args = ["train", "--recipe", "linear-probe", "--init", str(start), "--data-dir", str(pets_root), "--epochs",
            "3", "--out", str(out), *QUIET]  # fmt: skip
    assert petvit(args) == 0
    model, meta = load_artifact(out)
    assert torch.count_nonzero(model.head.weight) > 0
    splits = load_splits_like(pets_root, meta)
    images = torch.stack([splits.test[i][0] for i in range(8)])  # (8, 3, 64, 64) uint8, the probe's test view
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        assert torch.allclose(model(images), model.head(features), atol=1e-5)
    assert meta.preprocessing.resize_size == 73 and meta.preprocessing.interpolation == "bicubic"  # DeiT's policy


def load_splits_like(pets_root: Path, meta):
    from training.data import DataConfig

    splits = load_splits(DataConfig(data_dir=str(pets_root), image_size=64, download=False))
    splits.test = splits.test.with_transform(eval_transform(64, policy=meta.preprocessing))
    return splits


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "scratch"], "starts finetune or linear-probe"),
        (["--recipe", "finetune", "--variant", "b16"], "--variant does not apply"),
        (["--recipe", "linear-probe", "--set", "depth=1"], "--set does not apply"),
    ],
)
def test_init_artifact_is_refused_where_it_cannot_apply(imported_vit: Path, capsys, extra, message) -> None:
    assert petvit(["train", "--init", str(imported_vit), *extra, "--out", "/nonexistent/x.safetensors"]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_init_artifact_is_named(tmp_path: Path, capsys) -> None:
    assert petvit(["train", "--recipe", "finetune", "--init", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors: no such artifact" in capsys.readouterr().err


def test_without_init_the_recipes_start_where_they_did(chelsea) -> None:
    assert recipe_config("finetune").init == "imagenet" and recipe_config("finetune").variant == "b16"
    assert recipe_config("teacher", init="random").init == "random"
    # A petvit-trained artifact's policy gives the very view the policy-free transform always gave.
    policy = Preprocessing.for_config(get_config("b16"))
    assert torch.equal(eval_transform(224)(chelsea), eval_transform(224, policy=policy)(chelsea))


def test_an_imported_pets_head_teaches_a_distillation(pets_root: Path, tmp_path: Path) -> None:
    """--labels pets makes a published Pets classifier a teacher like a petvit-trained one (same labels, in order)."""
    hf_vit(tmp_path / "published")  # the 37 breeds, spelt as file prefixes
    teacher = tmp_path / "teacher.safetensors"
    assert petvit(["import", str(tmp_path / "published"), "--labels", "pets", "--out", str(teacher)]) == 0
    student = tmp_path / "student.safetensors"
    tiny = ["--set", "image_size=32", "--set", "patch_size=8", "--set", "hidden_dim=32", "--set", "depth=1", "--set",
            "num_heads=2", "--set", "mlp_dim=64"]  # fmt: skip
    args = ["train", "--recipe", "distill", "--teacher", str(teacher), "--data-dir", str(pets_root), "--epochs", "1",
            *tiny, "--out", str(student), *QUIET]  # fmt: skip
    assert petvit(args) == 0
    meta = read_metadata(student)
    assert meta.training["teacher"]["sha256"] == file_sha256(teacher) and meta.config.distilled
