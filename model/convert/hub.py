"""Published ViT/DeiT checkpoints -> petvit artifacts: `petvit import SOURCE --out ARTIFACT`.

SOURCE is a local folder in the Hugging Face hub's layout (config.json + model.safetensors [+ preprocessor_config.json],
as transformers' save_pretrained and timm's save_for_hf write it) or `hf-hub:ORG/NAME[@REVISION]`, fetched through
huggingface_hub (the `import` extra; imported only here, only for hub sources) into its usual cache, so a cache
filled elsewhere works offline with HF_HUB_OFFLINE=1.

Weights are read with safetensors only: a folder that has only pickle weights (pytorch_model.bin, *.pth) is refused
before any of its bytes are read. config.json says which library wrote the folder; its converter
(model/convert/hf.py, model/convert/timm_vit.py) maps the tensors and refuses what our ViT does not compute exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.artifact import ArtifactMetadata, file_sha256, save_artifact
from model.convert.checkpoints import Converted, UnsupportedCheckpoint, require
from model.convert.clip import MODEL_TYPES as CLIP_TYPES
from model.convert.clip import convert_clip
from model.convert.dinov2 import MODEL_TYPES as DINOV2_TYPES
from model.convert.dinov2 import convert_dinov2
from model.convert.hf import convert_transformers, is_transformers_config
from model.convert.timm_vit import convert_timm, is_timm_config
from model.convert.zero_shot import DEFAULT_TEMPLATES, TOKENIZER_FILES, zero_shot_head
from model.labels import BREEDS, PET_LABELS, breed_key, breed_species
from model.vit import ViT

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
HUB_FILES = ("config.json", WEIGHTS_FILE, "preprocessor_config.json")  # all that is ever fetched
_PICKLES = ("pytorch_model.bin", "*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ImportSourceError(ValueError):
    """The source cannot be read: no such folder or repo, offline without a cache, pickle-only weights, ..."""


@dataclass(frozen=True)
class Source:
    folder: Path  # where config.json and model.safetensors are
    provenance: dict[str, Any]  # repo/revision (hub) or folder (local)


LABEL_CHOICES = ("published", "pets")


@dataclass(frozen=True)
class ImportOptions:
    """How `petvit import` shapes what it converts (cli/import_.py's flags)."""

    labels: str = "published"  # LABEL_CHOICES
    zero_shot: str | None = None  # "pets" or a labels file: a CLIP text-tower head (model/convert/zero_shot.py)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # the prompt ensemble, "{}" standing for the class name
    image_size: int | None = None  # the input side; None: the processor's crop (position embeddings resampled)


def import_checkpoint(
    source: str, out: str | os.PathLike[str], name: str | None = None, labels: str = "published",
    options: ImportOptions | None = None,
) -> tuple[Path, ArtifactMetadata]:  # fmt: skip
    """Fetch or find `source`, convert it, write the artifact at `out`; returns (path, its metadata).

    labels="published" keeps the checkpoint's labels and class order; "pets" (a 37-breed head only) renames them
    to petvit's breed names and reorders the head to petvit's class order, so the artifact can be evaluated on
    Pets and teach a distillation like one petvit trained. options.zero_shot gives a CLIP checkpoint the head its
    text tower writes for the named classes."""
    options = options or ImportOptions(labels=labels)
    found = resolve_source(source, with_tokenizer=options.zero_shot is not None)
    converted = convert_folder(found.folder, options.image_size)
    if options.zero_shot is not None:
        converted = zero_shot_head(converted, found.folder, options.zero_shot, options.templates)
    elif options.labels == "pets":
        if not converted.trained:
            raise UnsupportedCheckpoint(
                f"{converted.architecture} has no classifier to put in Pets order; it imports as an untrained "
                "backbone for `petvit train --init`, or with --zero-shot pets"
            )
        converted = in_pet_order(converted)
    try:
        model = ViT.from_weights(converted.config, converted.state_dict)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
        lines = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4]) or (lines[0] if lines else "")
        raise UnsupportedCheckpoint(
            f"the weights do not fit the architecture config.json describes: {detail}"
        ) from None
    meta = artifact_metadata(converted, found, name or default_name(source))
    return save_artifact(model, out, meta), meta


def in_pet_order(converted: Converted) -> Converted:
    """The head's rows permuted into petvit's Pet class order, labelled with petvit's breed names: logits are the
    published ones, permuted (exact). Refused unless the labels name the 37 breeds, each once, in any spelling."""
    keys = [breed_key(label) for label in converted.labels]
    order = {breed_key(b.file_prefix): b.index for b in BREEDS}
    if sorted(keys) != sorted(order):
        unknown = [label for label, key in zip(converted.labels, keys, strict=True) if key not in order][:5]
        raise UnsupportedCheckpoint(
            f"--labels pets needs the 37 Oxford-IIIT Pet breeds, each once; this head has {len(keys)} classes"
            + (f", among them {unknown} that are not breeds" if unknown else "")
        )
    rows = torch.tensor([keys.index(breed_key(b.file_prefix)) for b in BREEDS])  # petvit class i <- published row
    state = dict(converted.state_dict)
    for name in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if name in state:
            state[name] = state[name][rows]  # (37, ...) rows in petvit's order
    notes = {**converted.notes, "labels_as_published": list(converted.labels)}
    return dataclasses.replace(converted, state_dict=state, labels=list(PET_LABELS), notes=notes)


def resolve_source(source: str, with_tokenizer: bool = False) -> Source:
    if source.startswith(HUB_PREFIX):
        return fetch_hub(source[len(HUB_PREFIX) :], TOKENIZER_FILES if with_tokenizer else ())
    folder = Path(source)
    if not folder.is_dir():
        raise ImportSourceError(
            f"{source} is not a folder; give a folder with config.json and {WEIGHTS_FILE} "
            f"(transformers' save_pretrained, timm's save_for_hf) or {HUB_PREFIX}ORG/NAME[@REVISION]"
        )
    return Source(folder, {"source": "folder", "folder": str(folder.resolve())})


def fetch_hub(spec: str, extra_files: tuple[str, ...] = ()) -> Source:
    """ORG/NAME[@REVISION] -> its snapshot folder in the hub cache (downloaded unless HF_HUB_OFFLINE=1)."""
    repo, _, revision = spec.partition("@")
    if not _REPO_ID.match(repo):
        raise ImportSourceError(f"{HUB_PREFIX}{spec}: expected {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError:
        raise ImportSourceError(
            f"importing {HUB_PREFIX}{repo} needs huggingface_hub: pip install 'petvit[import]' "
            "(or download the repo's files into a folder and import that folder)"
        ) from None
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=[*HUB_FILES, *extra_files]))
    except Exception as err:  # offline, no such repo or revision, gated, network: each says so in its message
        raise ImportSourceError(hub_unavailable_message(repo, revision, err, extra_files)) from None
    return Source(folder, {"source": "hf-hub", "repo": repo, "revision": folder.name, "requested": revision or "main"})


def hub_unavailable_message(repo: str, revision: str, err: Exception, extra_files: tuple[str, ...] = ()) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    at = f"@{revision}" if revision else ""
    return (
        f"could not get {repo}{at} from the Hugging Face hub ({type(err).__name__}: {first}). Check the name; "
        f"offline, fill the hub cache where the network is (`hf download {repo} {' '.join((*HUB_FILES, *extra_files))}`"
        f"{f' --revision {revision}' if revision else ''}), copy that cache here and run with HF_HOME=<the cache's "
        "parent folder> HF_HUB_OFFLINE=1; or import a local folder holding those files"
    )


def convert_folder(folder: Path, image_size: int | None = None) -> Converted:
    """A hub-layout folder -> Converted, by the library its config.json names (image_size: the input side of a
    CLIP or DINOv2 tower, see ImportOptions)."""
    doc = read_json(folder / "config.json", required=True)
    tensors = read_weights(folder)
    processor = read_json(folder / "preprocessor_config.json", required=False)
    try:
        if is_timm_config(doc):
            return convert_timm(doc, tensors, image_size)
        if is_transformers_config(doc) and doc.get("model_type") in CLIP_TYPES:
            return convert_clip(doc, tensors, processor, image_size)
        if is_transformers_config(doc) and doc.get("model_type") in DINOV2_TYPES:
            return convert_dinov2(doc, tensors, processor, image_size)
        if is_transformers_config(doc):
            require(image_size is None, "--image-size applies to CLIP, DINOv2 and timm checkpoints; a transformers "
                    "ViT/DeiT keeps its processor's size")  # fmt: skip
            return convert_transformers(doc, tensors, processor)
    except UnsupportedCheckpoint:
        raise
    except KeyError as err:  # a config entry or a tensor every ViT of that library has
        raise UnsupportedCheckpoint(f"{err.args[0]!r} is missing: not the ViT layout its library writes") from None
    except (ValueError, TypeError, IndexError) as err:  # values our ViTConfig refuses, malformed entries
        raise UnsupportedCheckpoint(f"its config does not describe a ViT petvit can build ({err})") from None
    raise UnsupportedCheckpoint(
        f"{folder / 'config.json'} is neither a transformers config (model_type) nor a timm one (architecture and "
        "pretrained_cfg)"
    )


@overload
def read_json(path: Path, required: Literal[True]) -> dict[str, Any]: ...
@overload
def read_json(path: Path, required: bool) -> dict[str, Any] | None: ...
def read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.exists():
        if required:
            raise ImportSourceError(f"{path.parent} has no {path.name}: not a hub-layout checkpoint folder")
        return None
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImportSourceError(f"{path} is not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ImportSourceError(f"{path} holds a JSON {type(doc).__name__}, not an object")
    return doc


def read_weights(folder: Path) -> dict[str, Any]:
    """model.safetensors' tensors; pickle-only folders are refused without opening the pickle."""
    path = folder / WEIGHTS_FILE
    if not path.exists():
        if (folder / f"{WEIGHTS_FILE}.index.json").exists():
            raise ImportSourceError(f"{folder} holds sharded safetensors; petvit reads one {WEIGHTS_FILE}")
        pickles = sorted({p.name for pattern in _PICKLES for p in folder.glob(pattern)})
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ImportSourceError(
            f"{folder} has {found} and no {WEIGHTS_FILE}. petvit reads safetensors only and never unpickles a file "
            "it is handed (a pickle can run any code). Ask the author for safetensors weights, or convert them where "
            "you trust the file: transformers' save_pretrained(..., safe_serialization=True) or timm's "
            "save_for_hf(..., safe_serialization=True)"
        )
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ImportSourceError(f"{path} is not a readable safetensors file ({err}); fetch it again") from None


def artifact_metadata(converted: Converted, found: Source, name: str) -> ArtifactMetadata:
    """Labels (species where they name Pet breeds), the library's preprocessing, and where the weights came from."""
    folder = found.folder
    files = {f: file_sha256(folder / f) for f in (*HUB_FILES, *TOKENIZER_FILES) if (folder / f).exists()}
    provenance = {
        **found.provenance,
        "library": converted.library,
        "architecture": converted.architecture,
        "files_sha256": files,
        **({"conversion": converted.notes} if converted.notes else {}),
    }
    return ArtifactMetadata.create(
        converted.config,
        {
            "name": name,
            "variant": None,
            "trained": converted.trained,
            "labels": converted.labels,
            "species": [breed_species(label) for label in converted.labels],
            "preprocessing": converted.preprocessing,
            "training": training_record(converted, provenance),
            "provenance": provenance,
        },
    )


def training_record(converted: Converted, provenance: dict[str, Any]) -> dict[str, Any]:
    """`imported`, `imported-backbone` (no classifier: an untrained head) or `zero-shot` (with its prompts)."""
    source = provenance.get("repo") or provenance.get("folder")
    if "zero_shot" in converted.notes:
        return {"recipe": "zero-shot", "source": source, **converted.notes["zero_shot"]}
    return {"recipe": "imported" if converted.trained else "imported-backbone", "source": source}


def default_name(source: str) -> str:
    """The artifact's name: the repo (ORG/NAME) or the folder's name."""
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX) :].partition("@")[0]
    return Path(source).resolve().name
