"""A CLIP model's text tower as a classification head: `petvit import SOURCE --zero-shot pets|LABELS_FILE`.

Each class name is written into every prompt template ("{}" stands for the name), the prompts pass once through
the checkpoint's own text tower (transformers' CLIPModel and the tokenizer saved beside it), each prompt embedding
is L2-normalised, a class's embeddings are averaged and normalised again (the prompt ensemble of Radford et al.
2021, section 3.1.4), and the head becomes

    head.weight = exp(logit_scale) x the normalised class embeddings (C, E),  head.bias = 0

over the image tower's normalised projection (ViTConfig.normalize_features): its logits are CLIP's
logits_per_image for those prompts. With one template, they are exactly transformers' logits_per_image.

The default ensemble is petvit's own list, written for photos of pets. The CLIP authors' published prompt for
Oxford-IIIT Pet (the repository's data/prompts.md) is the single template "a photo of a {}, a type of pet.";
the list below begins with it and adds variations of framing and quality in the spirit of their ImageNet ensemble.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.convert.checkpoints import Converted, UnsupportedCheckpoint
from model.labels import PET_LABELS

if TYPE_CHECKING:  # transformers is the zero-shot extra's, imported only when a text tower runs
    from transformers import CLIPModel, PreTrainedTokenizerBase

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of pet.",
    "a photo of the {}, a type of pet.",
    "a close-up photo of a {}, a type of pet.",
    "a blurry photo of a {}, a type of pet.",
    "a bright photo of a {}, a type of pet.",
    "a cropped photo of a {}, a type of pet.",
    "a low resolution photo of a {}, a type of pet.",
    "a photo of my {}.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


class ZeroShotError(ValueError):
    """The zero-shot head cannot be built: no text tower, no tokenizer, a bad labels file or template."""


def class_names(spec: str) -> tuple[list[str], str]:
    """(class names, where they came from): "pets" -> petvit's 37 breeds in its order; else a UTF-8 file with one
    class name per line, as written (surrounding spaces and blank lines dropped)."""
    if spec == "pets":
        return list(PET_LABELS), "pets"
    path = Path(spec)
    if not path.is_file():
        raise ZeroShotError(f"--zero-shot {spec}: give `pets` or a text file with one class name per line")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ZeroShotError(f"--zero-shot {spec} is not UTF-8 text ({err})") from None
    if len(names) < 2:
        raise ZeroShotError(f"--zero-shot {spec} names {len(names)} class(es); a classifier needs at least two")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ZeroShotError(f"--zero-shot {spec} names {repeated} more than once; each class once, one per line")
    return names, str(path)


def check_templates(templates: Sequence[str]) -> list[str]:
    missing = [t for t in templates if "{}" not in t]
    if missing or not templates:
        raise ZeroShotError(f"each --template needs {{}} where the class name goes, e.g. 'a photo of a {{}}.'; "
                            f"got {missing or 'none'}")  # fmt: skip
    return list(templates)


def prompts_for(name: str, templates: Sequence[str]) -> list[str]:
    """The class name put into each template as written (str.replace, so braces in a name stay literal)."""
    return [template.replace("{}", name) for template in templates]


def load_text_tower(folder: Path) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """(transformers CLIPModel, its tokenizer) from the folder; a clear error when either is missing."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ModuleNotFoundError:
        raise ZeroShotError("--zero-shot runs the checkpoint's text tower through transformers: "
                            "pip install 'petvit[zero-shot]'") from None  # fmt: skip
    if not ((folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()):
        raise ZeroShotError(f"{folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt): the class "
                            "prompts cannot be written as tokens; save the tokenizer beside the model")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = CLIPModel.from_pretrained(folder, use_safetensors=True)
        model.eval()  # type: ignore[no-untyped-call]  # transformers' PreTrainedModel.eval override is unannotated
    except (OSError, ValueError, KeyError) as err:
        raise ZeroShotError(f"could not load {folder}'s CLIP text tower or tokenizer ({err})") from None
    return model, tokenizer


@torch.no_grad()
def class_embeddings(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase, names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, E): per class, the mean of its prompts' unit text embeddings, normalised again."""
    rows = []
    for name in names:
        tokens = tokenizer(prompts_for(name, templates), padding=True, return_tensors="pt")
        out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        embeds = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output
        rows.append(F.normalize(F.normalize(embeds.float(), dim=-1).mean(dim=0), dim=-1))  # (T, E) -> (E,)
    return torch.stack(rows)  # (C, E)


def zero_shot_head(converted: Converted, folder: Path, spec: str, templates: Sequence[str]) -> Converted:
    """The converted CLIP image tower with the text tower's head for the classes `spec` names."""
    if converted.architecture != "CLIPModel":
        raise UnsupportedCheckpoint(
            f"--zero-shot needs a CLIPModel (image and text towers); this is a {converted.architecture}"
        )
    names, source = class_names(spec)
    templates = check_templates(templates)
    model, tokenizer = load_text_tower(folder)
    scale = float(model.logit_scale.detach().exp())
    weight = scale * class_embeddings(model, tokenizer, names, templates)  # (C, E)
    config = converted.config.replace(num_classes=len(names), normalize_features=True)
    state = {**converted.state_dict, "head.weight": weight, "head.bias": torch.zeros(len(names))}
    record = {"classes_from": source, "templates": templates, "logit_scale": scale,
              "ensemble": "mean of unit prompt embeddings, normalised"}  # fmt: skip
    notes = {**converted.notes, "zero_shot": record}
    return dataclasses.replace(converted, config=config, state_dict=state, labels=names, notes=notes, trained=True)
