"""CPU cost of each path to a Pets model that runs here offline: feature extraction per backbone (what a linear probe
spends its time on, and what a zero-shot artifact spends per served image), the zero-shot text tower's one pass over
the prompts, and each published checkpoint's download size.

    PYTHONPATH=. .venv/bin/python bench/tower_features.py --threads 1

Every backbone is petvit's ViT with the published architecture's switches (ViTConfig) at random init: the
arithmetic is the weights' shape, not their values, so the rate is the published model's. Download sizes are the
transformers checkpoints' parameter counts x 4 bytes (float32 safetensors), counted from the architectures on the
meta device, not fetched. Timed with this process's CPU clock (time.process_time), so a shared machine's neighbours
do not count; the median of --repeats. Prints a table, writes results/tower_features.json and .png (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model.config import ViTConfig, get_config
from model.inference import batch_outputs
from model.vit import ViT

PETS_IMAGES = 3680 + 3669  # trainval + test: what a linear probe extracts features for once
CLIP = dict(pre_norm=True, activation="quick_gelu", layer_norm_eps=1e-5)
BACKBONES = {
    # name: (our config, the transformers checkpoint it stands for)
    "ImageNet ViT-B/16": (get_config("b16", num_classes=37), "google/vit-base-patch16-224"),
    "CLIP ViT-B/16": (get_config("b16", num_classes=37, projection_dim=512, **CLIP), "openai/clip-vit-base-patch16"),
    "CLIP ViT-L/14": (
        ViTConfig(patch_size=14, hidden_dim=1024, depth=24, num_heads=16, mlp_dim=4096, projection_dim=768, **CLIP),
        "openai/clip-vit-large-patch14",
    ),
    "DINOv2 ViT-S/14": (
        ViTConfig(patch_size=14, hidden_dim=384, depth=12, num_heads=6, mlp_dim=1536, layer_scale=True),
        "facebook/dinov2-small",
    ),
    "DINOv2 ViT-B/14": (ViTConfig(patch_size=14, layer_scale=True), "facebook/dinov2-base"),
}


def feature_rate(config: ViTConfig, batch: int, repeats: int) -> float:
    """Images per CPU-second of model.inference.batch_outputs, the linear probe's feature extraction (the CLS
    feature and the head's input; the head itself is a rounding error next to the blocks)."""
    torch.manual_seed(0)
    model = ViT(config).eval()
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), dtype=torch.uint8)
    with torch.inference_mode():
        batch_outputs(model, images)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.process_time()
            batch_outputs(model, images)
            times.append(time.process_time() - start)
    return batch / statistics.median(times)


def checkpoint_parameters(repo: str) -> int:
    """The published checkpoint's parameter count, from its architecture on the meta device (nothing fetched)."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification

    with torch.device("meta"):
        if repo == "google/vit-base-patch16-224":
            model = ViTForImageClassification(ViTConfig(num_labels=1000))
        elif repo.startswith("openai/"):
            large = "large" in repo
            vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          patch_size=14) if large else dict(patch_size=16)  # fmt: skip
            text = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072) if large else {}
            model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=768 if large else 512))
        else:
            small = "small" in repo
            model = Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6) if small else Dinov2Config())
    return sum(p.numel() for p in model.parameters())


def text_tower_seconds(large: bool, prompts: int, tokens: int = 16) -> float:
    """CPU-seconds of CLIP's text tower over `prompts` prompts of `tokens` tokens: --zero-shot's one pass."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    wide = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    config = CLIPTextConfig(projection_dim=768, **wide) if large else CLIPTextConfig(projection_dim=512)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(config).eval()
    ids = torch.randint(0, config.vocab_size - 2, (prompts, tokens))
    with torch.inference_mode():
        start = time.process_time()
        for chunk in ids.split(8):  # as model/convert/zero_shot.py passes them: one class's prompts at a time
            model(input_ids=chunk)
        return time.process_time() - start


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for name, (config, repo) in BACKBONES.items():
        rate = feature_rate(config, args.batch_size, args.repeats)
        params = checkpoint_parameters(repo)
        row = {"backbone": name, "checkpoint": repo, "download_mb": round(params * 4 / 1e6), "images_per_cpu_s": rate,
               "pets_features_cpu_hours": PETS_IMAGES / rate / 3600,
               "gflop_per_image": ViT(config).flops_per_image() / 1e9}  # fmt: skip
        if name.startswith("CLIP"):
            row["zero_shot_text_cpu_s"] = text_tower_seconds("L/14" in name, 37 * 8)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [str(r["backbone"]) for r in rows]
    ax.barh(names, [float(r["pets_features_cpu_hours"]) for r in rows])
    ax.set_xlabel(f"CPU-hours to extract features for Pets' {PETS_IMAGES} images (one thread)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats, "clock": "process_time",
            "torch": torch.__version__}  # fmt: skip
    (args.out / "tower_features.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "tower_features.png")
    print(f"{'backbone':18} {'download':>9} {'GFLOP':>6} {'img/CPU-s':>9} {'Pets features':>13} {'text tower':>10}")
    for r in rows:
        text = f"{r['zero_shot_text_cpu_s']:.1f} s" if "zero_shot_text_cpu_s" in r else "-"
        print(f"{r['backbone']:18} {r['download_mb']:>6} MB {r['gflop_per_image']:>6.1f} {r['images_per_cpu_s']:>9.2f} "
              f"{r['pets_features_cpu_hours']:>11.2f} h {text:>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
