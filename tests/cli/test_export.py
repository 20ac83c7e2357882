"""`petvit export` through the real command line entry point."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import ViT_B_16_Weights

from cli.main import main
from model.artifact import load_artifact, read_metadata
from model.config import get_config
from model.export import export_artifact


def test_export_random_writes_an_untrained_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ti16.safetensors"
    assert main(["export", "--variant", "ti16", "--init", "random", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta.trained is False
    assert meta.variant == "ti16" and meta.name == "petvit-ti16-random"
    assert meta.provenance["source"] == "random init (seed 0)"
    assert len(meta.labels) == 37 and meta.labels[0] == "Abyssinian"
    model, _ = load_artifact(out)
    assert model.config == get_config("ti16", num_classes=37)
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert logits.shape == (1, 37)


def test_export_is_reproducible_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = load_artifact(export_artifact("vit_ti_16", tmp_path / "a.safetensors", seed=7))
    assert torch.equal(torch.rand(1), before)  # export drew from its own RNG stream
    b, _ = load_artifact(export_artifact("ti16", tmp_path / "b.safetensors", seed=7))
    c, _ = load_artifact(export_artifact("ti16", tmp_path / "c.safetensors", seed=8))
    assert torch.equal(a.pos_embed, b.pos_embed)
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_export_imagenet_offline_fails_with_the_file_to_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    out = tmp_path / "b16.safetensors"
    code = main(["export", "--variant", "b16", "--init", "imagenet", "--out", str(out)])
    assert code != 0
    err = capsys.readouterr().err
    expected_file = tmp_path / "torch" / "hub" / "checkpoints" / Path(ViT_B_16_Weights.IMAGENET1K_V1.url).name
    assert err.startswith("petvit export: could not get torchvision's ViT_B_16_Weights.IMAGENET1K_V1 weights")
    assert f"place it as {expected_file}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "b17"], "petvit export: unknown ViT variant 'b17'; choose one of ['b16', 'b32'"),
        (["--variant", "ti16", "--init", "imagenet"], "petvit export: torchvision has no pretrained weights"),
    ],
)
def test_export_bad_requests_exit_non_zero_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["export", *argv, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(message)
