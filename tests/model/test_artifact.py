"""Artifacts: a bit-exact round trip, and every way a file can be wrong refused with its own message."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.artifact import (
    FORMAT_VERSION,
    METADATA_KEY,
    ArtifactError,
    ArtifactNotFoundError,
    ArtifactUnreadableError,
    Preprocessing,
    file_sha256,
    load_artifact,
    read_metadata,
    save_artifact,
)
from model.labels import PET_LABELS, PET_SPECIES
from tests.conftest import make_tiny_model


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None) -> Path:
    """A hand-made safetensors file, bypassing save_artifact's own checks."""
    save_file(tensors, str(path), metadata=None if meta is None else {METADATA_KEY: json.dumps(meta)})
    return path


def saved_tensors_and_meta(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = save_artifact(make_tiny_model(), tmp_path / "good.safetensors")
    model, meta = load_artifact(path)
    return {k: v.contiguous() for k, v in model.state_dict().items()}, meta.to_dict()  # the stored JSON document


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = make_tiny_model(seed=3)
    extra = {"name": "petvit-tiny", "trained": True, "evaluation": {"top1": 0.8125, "per_class": [0.5] * 37}}
    path = save_artifact(model, tmp_path / "sub" / "tiny.safetensors", extra)
    loaded, meta = load_artifact(path)
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name
    assert loaded.config == model.config
    assert meta == read_metadata(path)
    doc = meta.to_dict()
    assert {k: doc[k] for k in extra} == extra
    assert doc["format_version"] == FORMAT_VERSION
    assert meta.labels == list(PET_LABELS) and meta.species == list(PET_SPECIES)
    assert doc["preprocessing"]["mean"] == list(model.config.mean)
    assert doc["config"] == model.config.to_dict()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert not list(tmp_path.glob("sub/.tiny*"))  # no temporary file left behind


def test_custom_labels_get_species_and_must_match_the_head(tmp_path: Path) -> None:
    model = make_tiny_model(num_classes=3)
    labels = ["Bengal", "pug", "Pug"]
    _, meta = load_artifact(save_artifact(model, tmp_path / "three.safetensors", {"labels": labels}))
    assert meta.species == ["cat", "unknown", "dog"]
    with pytest.raises(ValueError, match="the head has 3 classes but metadata lists 2 labels and 2 species"):
        save_artifact(model, tmp_path / "bad.safetensors", {"labels": labels[:2]})


def test_file_with_label_count_not_matching_the_head_is_refused(tmp_path: Path) -> None:
    tensors, meta = saved_tensors_and_meta(tmp_path)
    path = write_safetensors(tmp_path / "labels.safetensors", tensors, {**meta, "labels": meta["labels"][:36]})
    with pytest.raises(ArtifactError, match="the head has 37 classes but the metadata lists 36 labels"):
        load_artifact(path)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(make_tiny_model().state_dict(), path)
    with pytest.raises(ArtifactError, match=r"is a pickle \(torch\.save\) checkpoint; petvit never unpickles"):
        load_artifact(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ArtifactError, match="is a pickle"):
        read_metadata(legacy)


@pytest.mark.parametrize("keep", [0, 5, 100, -64], ids=["empty", "in-length-field", "in-header", "in-tensors"])
def test_truncated_file_is_refused(tmp_path: Path, tiny_artifact: Path, keep: int) -> None:
    data = tiny_artifact.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    with pytest.raises(ArtifactError, match=rf"is truncated.*{len(data[:keep])}") as info:
        load_artifact(path)
    if keep >= 8:
        assert "copy or download it again" in str(info.value)


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    tensors, meta = saved_tensors_and_meta(tmp_path)
    path = write_safetensors(tmp_path / "v99.safetensors", tensors, {**meta, "format_version": 99})
    with pytest.raises(ArtifactError, match=r"version 99; this petvit reads 'petvit-artifact' version 1\. Re-export"):
        load_artifact(path)


def test_safetensors_without_petvit_metadata_is_refused(tmp_path: Path) -> None:
    tensors, _ = saved_tensors_and_meta(tmp_path)
    path = write_safetensors(tmp_path / "plain.safetensors", tensors, None)
    with pytest.raises(ArtifactError, match="a safetensors file without petvit metadata; it is not a petvit artifact"):
        load_artifact(path)


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    tensors, meta = saved_tensors_and_meta(tmp_path)
    config = {**meta["config"], "mlp_dim": 48}  # the file's MLPs are 64 wide
    path = write_safetensors(tmp_path / "shapes.safetensors", tensors, {**meta, "config": config})
    with pytest.raises(ArtifactError, match="weights do not match the stored config: ") as info:
        load_artifact(path)
    message = str(info.value)
    assert "blocks.0.mlp.fc1.weight has shape (64, 32) in the file but (48, 32) in the stored config" in message
    assert message.endswith("; and 1 more")  # 6 mismatched MLP tensors in 2 blocks, 5 shown


def test_missing_tensor_and_invalid_config_are_refused(tmp_path: Path) -> None:
    tensors, meta = saved_tensors_and_meta(tmp_path)
    partial = {k: v for k, v in tensors.items() if k != "head.bias"}
    with pytest.raises(ArtifactError, match=r"weights do not match the stored config: missing head\.bias"):
        load_artifact(write_safetensors(tmp_path / "partial.safetensors", partial, meta))
    bad_config = {**meta, "config": {**meta["config"], "patch_size": 7}}
    with pytest.raises(ArtifactError, match="invalid model config: image_size 32 is not a multiple of patch_size 7"):
        load_artifact(write_safetensors(tmp_path / "config.safetensors", tensors, bad_config))


def test_garbage_and_missing_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "noise.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ArtifactError, match="is not a safetensors file: its header is not JSON"):
        load_artifact(garbage)
    absent = tmp_path / "absent.safetensors"
    with pytest.raises(ArtifactNotFoundError, match="petvit export --variant ti16 --init random --out") as info:
        load_artifact(absent)
    assert str(info.value).startswith(f"cannot load {absent}: no model artifact there; train one with `petvit train")
    with pytest.raises(ArtifactUnreadableError, match=f"^cannot load {re.escape(str(tmp_path))}: Is a directory$"):
        load_artifact(tmp_path)  # raised as an ArtifactError, never a bare OSError with a traceback


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"root:x:0:0:root:/root:/bin/bash\n", "not a safetensors file: it does not start with a header length"),
        (struct.pack("<Q", 4242) + b"secret", "is truncated or not a safetensors file: the header length it starts"),
        (struct.pack("<Q", 6) + b"\x80\x81{}\x00\x00", "is not a safetensors file: its header is not JSON"),
    ],
    ids=["text", "plausible-length", "not-utf8"],
)
def test_a_file_that_is_not_safetensors_is_refused_without_quoting_its_bytes(tmp_path: Path, caplog, content, says):
    """The service answers with these messages: none may carry a number decoded from the file (the length its
    first 8 bytes read as), nor what the JSON parser saw; the DEBUG log says where the parse stopped, not what."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    (decoded,) = struct.unpack("<Q", content[:8])
    caplog.set_level(logging.DEBUG, logger="petvit.artifact")
    with pytest.raises(ArtifactError) as info:
        read_metadata(path)
    message = str(info.value)
    assert message.startswith(f"{path} ") and says in message
    # the only number it may hold is the file's size, from the file system
    assert set(re.findall(r"\d+", message.removeprefix(str(path)))) <= {str(len(content))}, message
    said = (message + " ".join(record.getMessage() for record in caplog.records)).replace(str(path), "")
    for secret in (str(decoded), str(decoded + 8), "root", "secret", "0x80", "\\x80"):
        assert secret not in said, secret


def test_read_metadata_and_sha256(tiny_artifact: Path) -> None:
    meta = read_metadata(tiny_artifact)
    assert meta.name == "petvit-tiny-test" and meta.trained is False and meta.evaluation == {"top1": 0.5}
    assert file_sha256(tiny_artifact) == hashlib.sha256(tiny_artifact.read_bytes()).hexdigest()


def test_load_to_a_device(tiny_artifact: Path) -> None:
    model, _ = load_artifact(tiny_artifact, device="cpu")
    assert model.mean.device.type == "cpu" and model.pos_embed.device.type == "cpu"
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 37)


def test_artifact_whose_header_length_starts_like_a_pickle_still_loads(tmp_path: Path) -> None:
    """A header of 0x10280 bytes begins b"\\x80\\x02", the bytes a protocol-2 pickle starts with."""
    target, pad = 0x10280, 60_000
    path = tmp_path / "lookalike.safetensors"
    for _ in range(5):  # safetensors pads its header to a multiple of 8; converge on the exact length
        save_artifact(make_tiny_model(), path, {"notes": "x" * pad})
        length = int.from_bytes(path.read_bytes()[:8], "little")
        if length == target:
            break
        pad += target - length
    assert path.read_bytes()[:2] == b"\x80\x02"
    _, meta = load_artifact(path)
    assert meta.extra["notes"] == "x" * pad


def test_loaded_model_can_be_fine_tuned(tiny_artifact: Path) -> None:
    """Loading adopts the file's tensors as parameters (no random init first); they must still train."""
    model, _ = load_artifact(tiny_artifact)
    model.train()
    model(torch.rand(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_metadata_is_read_once_into_a_typed_object(tmp_path: Path) -> None:
    """Older artifacts without resize/mean/std get them from their config; keys this version does not model
    survive a re-save; a loaded artifact re-saves to the same document."""
    tensors, doc = saved_tensors_and_meta(tmp_path)
    doc["preprocessing"] = {"image_size": 32}  # as an early artifact might have it
    doc["future_key"] = {"kept": True}
    path = write_safetensors(tmp_path / "old.safetensors", tensors, doc)
    model, meta = load_artifact(path)
    assert meta.preprocessing == Preprocessing(32, 37, "bilinear", model.config.mean, model.config.std)
    assert meta.extra == {"future_key": {"kept": True}}
    again = save_artifact(model, tmp_path / "again.safetensors", meta.replace(trained=True))
    reread = read_metadata(again)
    assert reread.trained is True and reread.extra == meta.extra and reread.preprocessing == meta.preprocessing
    assert reread.replace(trained=False) == meta
    with pytest.raises(ValueError, match="the metadata describes"):
        save_artifact(make_tiny_model(hidden_dim=64), tmp_path / "other.safetensors", meta)


def test_artifact_gets_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    """Was 0600 (mkstemp's): a service running as another user could not read an artifact it was handed."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = save_artifact(make_tiny_model(), tmp_path / "shared.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
