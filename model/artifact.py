"""One self-contained model artifact: safetensors weights with petvit's JSON metadata in the header.

Loading never unpickles: safetensors is a JSON header plus raw tensor bytes, so a file a user hands us can at
worst be rejected, never execute code. The header is checked by hand first so each way a file can be wrong
(a pickle, a truncated copy, another format version, other shapes) gets a message that says what to do.

The messages never quote what a file that is not a safetensors file holds (no number decoded from its first bytes,
no JSON parser's position in it): the service answers with them, and they must not let a caller read a file
byte by byte. They name at most the path and its size; only once a file has shown a safetensors header do they
quote what that header declares. The parser's details go to the DEBUG log, without the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig, resize_size_for
from model.labels import PET_LABELS, PET_SPECIES, species_of
from model.trust import TENSOR_PREFIX, Calibration, OpenSet
from model.vit import ViT

FORMAT_NAME = "petvit-artifact"
FORMAT_VERSION = 1
METADATA_KEY = "petvit"  # the safetensors __metadata__ entry holding our JSON document
# What network a file holds. Absent means a ViT (every artifact before distillation teachers existed); a
# torchvision convnet teacher (model/convert/teachers.py) says {"kind": "torchvision", "name": ..., "num_classes": ...}.
ARCHITECTURE_KEY = "architecture"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own ceiling on header size

log = logging.getLogger("petvit.artifact")
_WHAT_TO_LOAD = "petvit loads the .safetensors files `petvit train`, `petvit export` and `petvit import` write"


class ArtifactError(ValueError):
    """The file is not a petvit artifact this version can load; the message says why and what to do."""


class ArtifactUnreadableError(ArtifactError):
    """There is no file this process can read at the path: missing, a folder, or no read permission."""


class ArtifactNotFoundError(ArtifactUnreadableError, FileNotFoundError):
    pass


class NotAViTArtifactError(ArtifactError):
    """The file is a petvit artifact of another network (a convnet distillation teacher), not a ViT."""


def check_vit_architecture(doc: Mapping[str, Any], source: str) -> None:
    """Refuse a document whose `architecture` is not a ViT, saying what the file is and what it is for."""
    architecture = doc.get(ARCHITECTURE_KEY)
    if architecture is None or (isinstance(architecture, Mapping) and architecture.get("kind") == "vit"):
        return
    if not isinstance(architecture, Mapping):
        raise ArtifactError(f"{source} has damaged petvit metadata (architecture {architecture!r} is not an object)")
    raise NotAViTArtifactError(
        f"{source} holds a {architecture.get('kind')} {architecture.get('name')} network, not a ViT: it is a "
        f"distillation teacher (`petvit train --recipe distill --teacher {source}`); serving, predicting and "
        "evaluating take ViT artifacts"
    )


def default_labels(num_classes: int) -> tuple[list[str], list[str]]:
    """The Pet breeds for a 37-way head; neutral names otherwise (callers with their own classes pass labels)."""
    if num_classes == len(PET_LABELS):
        return list(PET_LABELS), list(PET_SPECIES)
    labels = [f"class_{i}" for i in range(num_classes)]
    return labels, [species_of(label) for label in labels]


_INPUT_NOTE = "RGB (B, 3, H, W), uint8 0..255 or float 0..1; the model normalises with mean/std itself"
_INTERPOLATIONS = ("bilinear", "bicubic")
# How a photo is resized before the centre crop. shorter_side: the shorter side becomes resize_size and the aspect
# ratio is kept (torchvision's and timm's "center" eval transform). squash: both sides become resize_size, the
# aspect ratio is not kept (Hugging Face's ViTImageProcessor, with resize_size = image_size: no crop at all).
RESIZE_MODES = ("shorter_side", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the model's input: resize (resize_mode) to resize_size, centre-crop image_size, and
    (inside the model) normalise with mean/std. The service and evaluation both follow what the artifact states."""

    image_size: int = 224
    resize_size: int = 256  # torchvision's ImageNet eval ratio 256/224 unless the artifact says otherwise
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_mode: str = "shorter_side"  # absent from artifacts written before imports existed: what they all did

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    @classmethod
    def for_config(cls, config: ViTConfig) -> Preprocessing:
        return cls(config.image_size, resize_size_for(config.image_size), "bilinear", config.mean, config.std)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], config: ViTConfig) -> Preprocessing:
        """The stored policy; what an older artifact leaves out follows from its config (the evaluation's ratio)."""
        size = int(doc.get("image_size") or config.image_size)
        return cls(
            image_size=size,
            resize_size=int(doc.get("resize_size") or resize_size_for(size)),
            interpolation=str(doc.get("interpolation") or "bilinear"),
            mean=tuple(doc.get("mean") or config.mean),
            std=tuple(doc.get("std") or config.std),
            resize_mode=str(doc.get("resize_mode") or "shorter_side"),
        )

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "input": _INPUT_NOTE,
        }
        if self.resize_mode != "shorter_side":  # stored only when it differs: older readers ignore unknown keys
            doc["resize_mode"] = self.resize_mode
        return doc


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an artifact says about its model besides the weights, read and checked once (ArtifactMetadata.from_dict)
    and then used by attribute. `training`, `evaluation` and `provenance` are records for people and reports
    (free-form JSON objects); everything code acts on has its own typed field."""

    config: ViTConfig
    labels: list[str]
    species: list[str]
    preprocessing: Preprocessing
    name: str = "petvit"
    variant: str | None = None
    trained: bool = False  # False: the head is untrained and its predictions mean nothing yet
    training: dict[str, Any] = field(default_factory=dict)  # recipe, data, seeds, history, commit, ...
    evaluation: dict[str, Any] = field(default_factory=dict)  # the test summary shown at /v1/model
    provenance: dict[str, Any] = field(default_factory=dict)  # where the weights came from, when, with what torch
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not model, kept on re-save
    # Trust (model/trust.py): a temperature for calibrated scores, and how to call an image unknown. None in an
    # artifact without them, which then answers exactly as before (uncalibrated scores, `unknown` null).
    calibration: Calibration | None = None
    open_set: OpenSet | None = None

    def __post_init__(self) -> None:
        n = self.config.num_classes
        if len(self.labels) != n or len(self.species) != n:
            raise ValueError(
                f"the head has {n} classes but metadata lists {len(self.labels)} labels and {len(self.species)} species"
            )

    @classmethod
    def create(cls, config: ViTConfig, overrides: Mapping[str, Any] | None = None) -> ArtifactMetadata:
        """Metadata for a new artifact of this config: defaults (Pet labels for a 37-way head, the config's
        preprocessing), then `overrides`; species follow the labels unless given; provenance is stamped."""
        doc = dict(overrides or {})
        labels, species = default_labels(config.num_classes)
        if "labels" in doc:
            labels = list(doc.pop("labels"))
            species = [species_of(label) for label in labels]
        species = list(doc.pop("species", species))
        preprocessing = doc.pop("preprocessing", None)
        if isinstance(preprocessing, Mapping):
            preprocessing = Preprocessing.from_dict(preprocessing, config)
        provenance = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **dict(doc.pop("provenance", None) or {}),
        }
        for key in ("format", "format_version", "config"):  # these describe the file itself: never the caller's
            doc.pop(key, None)
        named = ("name", "variant", "trained", "training", "evaluation")
        known: dict[str, Any] = {k: doc.pop(k) for k in named if k in doc}
        known |= _trust_fields(doc.pop("calibration", None), doc.pop("open_set", None), "the metadata")
        return cls(
            config=config,
            labels=labels,
            species=species,
            preprocessing=preprocessing or Preprocessing.for_config(config),
            provenance=provenance,
            extra=doc,
            **known,
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "the artifact") -> ArtifactMetadata:
        """Parse and check a stored metadata document; ArtifactError says what is wrong with it."""
        check_format(doc, source)
        check_vit_architecture(doc, source)
        try:
            config = ViTConfig.from_dict(doc["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{source} holds an invalid model config: {err}") from None
        for key in ("labels", "species"):
            names = doc.get(key)
            if not isinstance(names, list) or len(names) != config.num_classes:
                count = len(names) if isinstance(names, list) else "no"
                raise ArtifactError(
                    f"{source}: the head has {config.num_classes} classes but the metadata lists {count} {key}; "
                    "every class needs exactly one label and one species"
                )
        records = {k: dict(doc.get(k) or {}) for k in ("training", "evaluation", "provenance")}
        modelled = {"format", "format_version", "config", "labels", "species", "preprocessing", "name", "variant"}
        modelled.add(ARCHITECTURE_KEY)  # only ever "vit" here, and implied by the config
        modelled |= {"calibration", "open_set"}
        return cls(
            config=config,
            labels=[str(label) for label in doc["labels"]],
            species=[str(s) for s in doc["species"]],
            preprocessing=Preprocessing.from_dict(doc.get("preprocessing") or {}, config),
            name=str(doc.get("name") or "petvit"),
            variant=doc.get("variant"),
            trained=bool(doc.get("trained")),
            extra={k: v for k, v in doc.items() if k not in modelled | {"trained", *records}},
            training=records["training"],
            evaluation=records["evaluation"],
            provenance=records["provenance"],
            **_trust_fields(doc.get("calibration"), doc.get("open_set"), source),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in the file (the keys petvit has always written, plus `extra`)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "variant": self.variant,
            "trained": self.trained,
            "labels": list(self.labels),
            "species": list(self.species),
            "preprocessing": self.preprocessing.to_dict(),
            "training": dict(self.training),
            "evaluation": dict(self.evaluation),
            "provenance": dict(self.provenance),
            **self.extra,
            **({"calibration": self.calibration.to_dict()} if self.calibration else {}),
            **({"open_set": self.open_set.to_dict()} if self.open_set else {}),
            "config": self.config.to_dict(),
        }

    def replace(self, **changes: Any) -> ArtifactMetadata:
        return dataclasses.replace(self, **changes)


def _trust_fields(calibration: Any, open_set: Any, source: str) -> dict[str, Any]:
    """The typed calibration and open-set fields from stored JSON (or already typed values); absent stays absent."""
    fields: dict[str, Any] = {}
    try:
        if calibration is not None:
            fields["calibration"] = (
                calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
            )
        if open_set is not None:
            fields["open_set"] = open_set if isinstance(open_set, OpenSet) else OpenSet.from_dict(open_set)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ArtifactError(f"{source} has invalid calibration or open-set metadata: {err}") from None
    return fields


def check_format(doc: Mapping[str, Any], source: str) -> None:
    """Refuse another container format or version, saying what to do."""
    if doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{source} has artifact format {doc.get('format')!r} version {doc.get('format_version')!r}; "
            f"this petvit reads {FORMAT_NAME!r} version {FORMAT_VERSION}. Re-export it with this version of petvit."
        )


def save_file_atomically(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """safetensors save_file through a uniquely named temp file in the same folder, then a rename: a crash never
    leaves half a file, and two writers of the same path never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        # mkstemp makes the file owner-only (0600); give it the mode any new file gets (0644 under the usual umask),
        # so a service running as another user (a container, a k8s pod) can read the artifact it is handed.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_artifact(
    model: ViT, path: str | os.PathLike[str], metadata: ArtifactMetadata | Mapping[str, Any] | None = None
) -> Path:
    """Write weights + metadata to one .safetensors file, atomically (a crash never leaves half a file).

    `metadata` is a complete ArtifactMetadata (re-saving a loaded artifact) or the fields to set on a new one.
    """
    if not isinstance(metadata, ArtifactMetadata):
        metadata = ArtifactMetadata.create(model.config, metadata)
    elif metadata.config != model.config:
        raise ValueError(f"the metadata describes {metadata.config}, not this model's {model.config}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if metadata.open_set is not None:  # the open set's class means and precision travel beside the weights
        tensors |= {TENSOR_PREFIX + k: t.detach().to("cpu").contiguous() for k, t in metadata.open_set.tensors.items()}
    return save_file_atomically(tensors, path, metadata={METADATA_KEY: json.dumps(metadata.to_dict())})


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header without reading any tensor data."""
    if not path.exists():
        raise ArtifactNotFoundError(
            f"cannot load {path}: no model artifact there; train one with `petvit train --out {path}` "
            f"or write an untrained one with `petvit export --variant ti16 --init random --out {path}`"
        )
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as err:  # a folder, no read permission, ...
        raise ArtifactUnreadableError(f"cannot load {path}: {err.strerror or type(err).__name__}") from None
    with f:
        prefix = f.read(9)
        # A safetensors header is JSON right after the 8-byte length, so byte 8 is "{". Check that first: the
        # length's low byte alone can equal pickle's 0x80 opcode (any header of 128 + 256k bytes), so sniffing
        # the first byte for a pickle would refuse about one valid artifact in 256.
        looks_safetensors = prefix[8:9] == b"{"
        is_zip = prefix[:4] == b"PK\x03\x04"  # torch.save's default zip container
        is_pickle = prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # PROTO opcode
        if not looks_safetensors and (is_zip or is_pickle):
            raise ArtifactError(
                f"{path} is a pickle (torch.save) checkpoint; petvit never unpickles files it is handed. "
                "Convert the weights to a petvit artifact (model.artifact.save_artifact) where you trust the file."
            )
        prefix = prefix[:8]
        f.seek(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{path} is truncated ({size} bytes): not even a safetensors header is there")
        # Until the header parses, the file may be anything (a password file): its decoded length stays unsaid.
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise ArtifactError(
                f"{path} is not a safetensors file: it does not start with a header length; {_WHAT_TO_LOAD}"
            )
        if 8 + header_len > size:
            raise ArtifactError(
                f"{path} is truncated or not a safetensors file: the header length it starts with runs past its end "
                f"({size} bytes); copy or download it again"
            )
        # JSON of any shape until `.items()` below proves it a mapping (AttributeError otherwise)
        header: dict[str, Any] = _parse_header_json(f.read(header_len), path)
    try:
        data_end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise ArtifactError(f"{path} is not a safetensors file: its header does not describe tensors") from None
    if 8 + header_len + data_end > size:  # a safetensors header by now: its own figures may be quoted
        raise ArtifactError(
            f"{path} is truncated: its tensors need {8 + header_len + data_end} bytes but the file has {size}; "
            "copy or download it again"
        )
    return header


def _parse_header_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        # The parser's own message quotes the offending byte (UnicodeDecodeError): the log gets where, never what.
        where = err.start if isinstance(err, UnicodeDecodeError) else err.pos
        log.debug("%s: header is not JSON (%s at offset %d of the header)", path, type(err).__name__, where)
        raise ArtifactError(f"{path} is not a safetensors file: its header is not JSON; {_WHAT_TO_LOAD}") from None


def read_metadata(path: str | os.PathLike[str]) -> ArtifactMetadata:
    """The artifact's metadata alone (cheap: reads only the header)."""
    return ArtifactMetadata.from_dict(read_metadata_document(path), source=str(Path(path)))


def read_metadata_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw JSON document in an artifact's header, checked to be one (any architecture; not yet validated)."""
    path = Path(path)
    header = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{path} is a safetensors file without petvit metadata; it is not a petvit artifact")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} has damaged petvit metadata (not JSON: {err})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} has damaged petvit metadata (a JSON {type(doc).__name__}, not an object)")
    return doc


def load_artifact(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> tuple[ViT, ArtifactMetadata]:
    """Rebuild the model from its stored config and weights; returns (model in eval mode, metadata)."""
    path = Path(path)
    meta = read_metadata(path)
    config = meta.config
    try:
        tensors = load_file(path, device="cpu")
    except SafetensorError as err:
        raise ArtifactError(f"{path} is a damaged safetensors file: {err}") from None
    meta = _with_open_set_tensors(meta, tensors, path)
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = ViT(config).state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(t.shape)} in the file but {tuple(expected[k].shape)} in the stored config"
        for k, t in tensors.items()
        if k in expected and t.shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(f"{path}: weights do not match the stored config: {shown}")
    model = ViT.from_weights(config, tensors)
    if device is not None:
        model = model.to(device)
    return model.eval(), meta


def _with_open_set_tensors(meta: ArtifactMetadata, tensors: dict[str, torch.Tensor], path: Path) -> ArtifactMetadata:
    """Move the open set's tensors (TENSOR_PREFIX...) out of `tensors` and into meta.open_set, checked."""
    stored = {k.removeprefix(TENSOR_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(TENSOR_PREFIX)}
    if meta.open_set is None:
        if stored:
            raise ArtifactError(f"{path} holds open-set tensors {sorted(stored)} but no open-set metadata")
        return meta
    open_set = dataclasses.replace(meta.open_set, tensors={k: t.float() for k, t in stored.items()})
    try:
        open_set.check_tensors(str(path))
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    return meta.replace(open_set=open_set)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
