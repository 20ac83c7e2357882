"""PETVIT_ZERO_SHOT: compose's one-line switch from training to a zero-shot CLIP import (entrypoint.py as-owner),
without Docker; docker-compose.yml hands the variable to train, and the image has what the import needs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compose_entrypoint_zs", ROOT / "deploy" / "compose" / "entrypoint.py")
entrypoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entrypoint)

TRAIN = ["train", "--recipe", "auto", "--dataset", "pets", "--data-dir", "/data", "--out", "/artifacts/p.safetensors",
         "--if-missing", "--device", "auto"]  # fmt: skip


def test_the_switch_replaces_train_with_a_zero_shot_import(monkeypatch) -> None:
    monkeypatch.setenv("PETVIT_ZERO_SHOT", "hf-hub:openai/clip-vit-base-patch16")
    monkeypatch.delenv("HF_HOME", raising=False)
    argv = entrypoint.zero_shot_instead(TRAIN)
    assert argv == ["import", "hf-hub:openai/clip-vit-base-patch16", "--zero-shot", "pets", "--out",
                    "/artifacts/p.safetensors"]  # fmt: skip
    assert os.environ["HF_HOME"] == "/data/huggingface"  # a cache filled elsewhere, in ./data, works offline


def test_without_the_switch_or_with_an_artifact_train_runs_as_before(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PETVIT_ZERO_SHOT", "")
    assert entrypoint.zero_shot_instead(TRAIN) == TRAIN
    monkeypatch.setenv("PETVIT_ZERO_SHOT", "hf-hub:openai/clip-vit-base-patch16")
    existing = tmp_path / "p.safetensors"
    existing.write_bytes(b"x")
    kept = [*TRAIN[:8], str(existing), *TRAIN[9:]]
    assert entrypoint.zero_shot_instead(kept) == kept  # --if-missing: the artifact there is served
    assert entrypoint.zero_shot_instead(["evaluate", "--checkpoint", "x"]) == ["evaluate", "--checkpoint", "x"]


def test_compose_passes_the_switch_to_train_and_the_image_can_run_the_text_tower() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["train"]["environment"]["PETVIT_ZERO_SHOT"] == "${PETVIT_ZERO_SHOT:-}"
    assert "extras['zero-shot']" in (ROOT / "Dockerfile").read_text()
