"""training/evaluate.py: the metrics by hand, the report files, the split it evaluates on, the metadata write-back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli.main import main
from model.artifact import file_sha256, read_metadata, save_artifact
from tests.conftest import make_tiny_model
from training.data import DataConfig, load_splits
from training.evaluate import compute_metrics, evaluate_artifact, metadata_summary, write_report
from training.plots import plot_training_curves

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metrics_match_a_hand_worked_example() -> None:
    labels, species = ["Bengal", "Persian", "Beagle", "Pug"], ["cat", "cat", "dog", "dog"]
    # Predictions (argmax): 0 -> 0 right; 0 -> 1 wrong breed, right species; 2 -> 2 right; 3 -> 0 wrong species.
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0], [2.0, 3.0, 0.0, 1.0], [0.0, 0.0, 4.0, 1.0], [3.0, 0.0, 1.0, 2.0]])
    targets = torch.tensor([0, 0, 2, 3])
    m = compute_metrics(logits, targets, labels, species)
    assert m["top1"] == pytest.approx(0.5)
    assert m["top5"] == pytest.approx(1.0) and m["top5_k"] == 4  # 4 classes: top-k over all of them
    assert m["per_class"] == {"Bengal": 0.5, "Persian": None, "Beagle": 1.0, "Pug": 0.0}
    assert m["mean_per_class"] == pytest.approx(0.5)
    assert m["cat_vs_dog"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert m["num_images"] == 4
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())


def test_top5_counts_the_true_class_anywhere_in_the_five_best() -> None:
    logits = torch.arange(10.0).repeat(2, 1)  # class 9 best, then 8, 7, 6, 5
    m = compute_metrics(logits, torch.tensor([5, 4]), [f"c{i}" for i in range(10)], ["unknown"] * 10)
    assert m["top1"] == 0.0 and m["top5"] == pytest.approx(0.5) and m["cat_vs_dog"] is None


def test_empty_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ["a", "b", "c"], ["cat"] * 3)


def test_report_files_are_written_and_open(tmp_path: Path) -> None:
    labels = ["a", "b"]
    report = {"name": "t", "dataset": "folder", "split": "test"}
    report |= compute_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), labels, ["cat", "dog"])
    history = [
        {"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_top1": 0.3, "val_top1": 0.4, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.9, "train_top1": 0.6, "val_top1": 0.5, "lr": 1e-4},
    ]
    paths = write_report(report, labels, tmp_path, history)
    saved = json.loads(paths["report"].read_text())
    assert saved["top1"] == 0.5 and saved["files"]["curves"].endswith("training_curves.png")
    for key in ("confusion_matrix", "curves"):
        with Image.open(paths[key]) as image:
            image.verify()
            assert image.format == "PNG"
    summary = metadata_summary(saved)
    assert "confusion_matrix" not in summary and summary["top1"] == 0.5 and summary["cat_vs_dog"] == 0.5


def test_curves_plot_copes_with_missing_values(tmp_path: Path) -> None:
    path = plot_training_curves([{"epoch": 1, "train_loss": 1.0, "val_top1": None}], tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.size[0] > 0


@pytest.fixture
def folder_artifact(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-class ImageFolder tree and a tiny artifact that records the split it was 'trained' with."""
    root = tmp_path / "tree"
    for c, name in enumerate(("Bengal", "beagle", "pug")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 40), (100 * c, 20 * i, 50)).save(root / name / f"{i}.png")
    artifact = tmp_path / "m.safetensors"
    data = DataConfig(dataset="folder", data_dir=str(root), image_size=32, split_seed=5, test_fraction=0.3)
    save_artifact(
        make_tiny_model(num_classes=3),
        artifact,
        {"labels": ["Bengal", "Beagle", "Pug"], "trained": True, "training": {"data": data.to_dict()}},
    )
    return artifact, root


def test_evaluate_uses_the_split_recorded_in_the_artifact(folder_artifact, tmp_path: Path) -> None:
    artifact, root = folder_artifact
    report = evaluate_artifact(artifact, output_dir=tmp_path / "out")
    expected = load_splits(DataConfig(dataset="folder", data_dir=str(root), split_seed=5, test_fraction=0.3))
    assert report["num_images"] == len(expected.test) == 9
    assert report["dataset"] == "folder" and report["data_dir"] == str(root)
    assert sum(report["per_class_support"].values()) == 9 and set(report["per_class_support"].values()) == {3}
    assert report["cat_vs_dog"] is not None  # Bengal is a cat, beagle and pug dogs
    assert read_metadata(artifact).evaluation == {}  # not written back unless asked


def test_evaluate_cli_writes_the_summary_into_the_artifact(folder_artifact, tmp_path: Path, capsys) -> None:
    artifact, _ = folder_artifact
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", str(artifact), "--output-dir", str(out), "--write-metadata"]) == 0
    assert "top-1" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    meta = read_metadata(artifact)
    assert meta.evaluation["top1"] == pytest.approx(report["top1"])
    assert set(meta.evaluation["per_class"]) == {"Bengal", "Beagle", "Pug"}
    assert meta.trained is True and meta.labels == ["Bengal", "Beagle", "Pug"]  # rest of metadata kept
    assert not (out / "training_curves.png").exists()  # no training history in this artifact, so no curves


def test_evaluate_cli_missing_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.safetensors"), "--data-dir", str(tmp_path)]) == 2
    assert "no model artifact" in capsys.readouterr().err


def test_evaluate_refuses_data_with_the_same_count_of_other_classes(folder_artifact, tmp_path: Path, capsys) -> None:
    artifact, _ = folder_artifact
    other = tmp_path / "other"
    for name in ("Bengal", "beagle", "boxer"):  # 3 classes like the artifact, but boxer is not pug
        (other / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 40), (20 * i, 50, 50)).save(other / name / f"{i}.png")
    argv = ["evaluate", "--checkpoint", str(artifact), "--data-dir", str(other), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2  # was: a report scoring boxer images against the pug output
    err = capsys.readouterr().err
    assert "class 2 is 'Pug' in the artifact, 'Boxer' in the data" in err and "Traceback" not in err


def test_report_sha256_names_the_artifact_after_the_metadata_write(folder_artifact, tmp_path: Path) -> None:
    from model.artifact import file_sha256

    artifact, _ = folder_artifact
    report = evaluate_artifact(artifact, output_dir=tmp_path / "out", write_metadata=True)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["checkpoint_sha256"] == saved["checkpoint_sha256"] == file_sha256(artifact)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_evaluate_scores_in_the_dtype_asked_for(folder_artifact, tmp_path: Path, capsys, dtype: str) -> None:
    """`petvit evaluate --dtype` lets a user check their own model in the dtype they mean to serve."""
    artifact, _ = folder_artifact
    before = file_sha256(artifact)
    reference = evaluate_artifact(artifact, output_dir=tmp_path / "fp32", dtype="float32")
    out = tmp_path / dtype
    assert main(["evaluate", "--checkpoint", str(artifact), "--output-dir", str(out), "--dtype", dtype]) == 0
    assert f"9 images, {dtype}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == dtype and report["num_images"] == reference["num_images"] == 9
    # Same weights, a coarser arithmetic: the loss moves a little, never far.
    assert report["loss"] == pytest.approx(reference["loss"], abs=0.05)
    assert file_sha256(artifact) == before  # scored in another dtype, the artifact itself is untouched
