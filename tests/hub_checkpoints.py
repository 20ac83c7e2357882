"""Published-checkpoint stand-ins for the import tests: transformers' and timm's own modules at random init (every
weight drawn wide enough that a mapping mistake shows in the logits), saved by each library's own save function in
the hub layout, and a Hugging Face hub cache laid out by hand as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.labels import BREEDS

# Pet breeds spelt as Hugging Face fine-tunes tend to spell them (the dataset's file prefixes, lower case).
HF_PET_LABELS = [b.file_prefix.lower() for b in BREEDS]


def randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter redrawn around its role's centre (norm and LayerScale gains around 1, the rest around 0),
    eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_gain = param.ndim == 1 and ("norm" in name) and name.endswith("weight")
            is_gain = is_norm_gain or name.endswith((".gamma", ".lambda1"))  # LayerScale: a gain too
            param.copy_(noise + 1.0 if is_gain else noise)
    return module.eval()


def photo_pixels(photo: Image.Image, size: int) -> torch.Tensor:
    """The photo squashed to size x size by PIL (bilinear): (1, 3, size, size) uint8, the pixels both sides see."""
    array = np.asarray(photo.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]  # (S, S, 3) -> (1, 3, S, S)


def normalized(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """What a library's processor hands its model: 0..255 -> 0..1, then (x - mean) / std."""
    x = pixels.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hf_vit(folder: Path, patch_size: int = 16, image_size: int = 64, labels: list[str] | None = None, seed: int = 0):
    """transformers ViTForImageClassification (2 layers, width 64) + ViTImageProcessor, save_pretrained to folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = labels or HF_PET_LABELS
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size,
        patch_size=patch_size, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    model = randomize(ViTForImageClassification(config), seed)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model


def hf_deit(folder: Path, with_teacher: bool = True, image_size: int = 64, seed: int = 0):
    """transformers DeiTForImageClassification[WithTeacher] (2 layers, width 64), save_pretrained to folder."""
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size,
        patch_size=16, num_labels=37, id2label=dict(enumerate(HF_PET_LABELS)),
    )  # fmt: skip
    cls = DeiTForImageClassificationWithTeacher if with_teacher else DeiTForImageClassification
    model = randomize(cls(config), seed)
    model.save_pretrained(folder)
    return model


def timm_model(
    folder: Path, architecture: str, seed: int = 0, labels: list[str] | None = None, num_classes: int = 37, **kwargs
):
    """timm.create_model(architecture, depth=2, 37 classes, **kwargs), save_for_hf (safetensors) to folder."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, depth=2, **kwargs)
    model = randomize(model, seed)
    save_for_hf(model, str(folder), model_config={"label_names": labels or HF_PET_LABELS}, safe_serialization=True)
    return model


def fill_hub_cache(hf_home: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The files of `folder` as huggingface_hub caches repo `repo` at `commit` on branch main: blobs named by
    content hash, snapshots/<commit>/<file> linking to them, refs/main naming the commit."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, root / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) writes bytes as: printable Latin-1 bytes as
    themselves, the rest shifted past 255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer from a hand-written vocabulary: every byte as itself and as a word end (byte-level BPE, as
    CLIP's), a few merges, CLIP's two special tokens; saved to folder by save_pretrained."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    merges = [("o", "f</w>"), ("t", "h"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)
    tokenizer.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json, as CLIP's hub repos carry them
    return tokenizer


def hf_clip(folder: Path, image_size: int = 56, patch_size: int = 14, seed: int = 0):
    """transformers CLIPModel (towers of 2 layers, width 64; projection 32) + CLIPImageProcessor + a tokenizer,
    save_pretrained to folder; returns (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer(folder)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=len(tokenizer), max_position_embeddings=96, **ids)  # fmt: skip
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=image_size, patch_size=patch_size)  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32, logit_scale_init_value=2.6592)
    model = randomize(CLIPModel(config), seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.6592)  # CLIP's init, log(1 / 0.07); randomize would have drawn it near 0
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(folder)
    return model, tokenizer


def hf_dinov2(folder: Path, image_size: int = 56, crop: int = 28, seed: int = 0):
    """transformers Dinov2Model (2 layers, width 64, patch 14; position embeddings learned at image_size) + the
    processor DINOv2's hub repos carry (BitImageProcessor: shorter side 256/224 of the crop, crop, ImageNet
    mean/std), save_pretrained to folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                          image_size=image_size, patch_size=14)  # fmt: skip
    model = randomize(Dinov2Model(config), seed)
    model.save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": round(crop * 256 / 224)}, crop_size=crop, resample=3,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    processor.save_pretrained(folder)
    return model


def digits_folder(root: Path, per_class: int = 20) -> Path:
    """per_class of each of scikit-learn's real 8x8 handwritten digits as an ImageFolder tree (root/<digit>/<n>.png)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)  # the dataset's 0..16 ink levels -> 0..255
            Image.fromarray(pixels, "L").convert("RGB").save(root / str(digit) / f"{i}.png")
    return root


def probe_argv(start: Path, data: Path, out: Path, recipe: str = "linear-probe") -> list[str]:
    """`petvit train` of a head (or the whole network) from an imported artifact on an ImageFolder tree, quietly."""
    return ["train", "--recipe", recipe, "--init", str(start), "--dataset", "folder", "--data-dir", str(data),
            "--epochs", "2", "--batch-size", "32", "--out", str(out), "--output-dir", str(out.parent / "run"),
            "--workers", "0", "--threads", "1", "--no-download"]  # fmt: skip
