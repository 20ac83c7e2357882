"""int8 schemes against float32 on trained artifacts' own held-out images: the served one (torchao, activations
per token at run time) and bench/pt2e.py's export quantisation, dynamic and static (calibrated on validation
images, never on the scored ones). Top-1 agreement with float32 is the bar each must clear (>= 98 %).

    .venv/bin/python bench/int8_schemes.py --checkpoint results/fashion_mnist/*/alone-seed*.safetensors

Each artifact is scored on the test split it was trained with (its training record's fractions and seed, on the
data folder it names, or --data-dir). Writes results/int8_schemes.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import machine
from bench.pt2e import pt2e_int8
from model.artifact import load_artifact
from model.inference import prepare_for_inference
from training.data import eval_transform, load_splits
from training.evaluate import data_config_from_metadata

CPU = torch.device("cpu")


def stacked(view: object, limit: int | None = None) -> torch.Tensor:
    """A view's images (N, 3, S, S) uint8, the first `limit` of them."""
    items = list(view)[:limit] if limit else list(view)  # type: ignore[call-overload]
    return torch.stack([image for image, _ in items])


def in_batches(forward: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Top-1 of `forward` over `images` in batches of exactly `batch` (the last one padded with its own first
    image): an exported graph is specialised to the shape it was exported at."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = torch.cat([chunk, chunk[:1].expand(batch - len(chunk), -1, -1, -1)])  # (batch, 3, S, S)
        out.append(forward(padded)[: len(chunk)].argmax(-1))
    return torch.cat(out)


def schemes(checkpoint: Path, data_dir: str | None, calibration: int, batch: int) -> dict[str, float]:
    model, meta = load_artifact(checkpoint)
    model.eval()
    data = data_config_from_metadata(meta, None, data_dir)
    splits = load_splits(dataclasses.replace(data, cache_images=False))
    view = eval_transform(model.config.image_size, policy=meta.preprocessing)
    test, labels = stacked(splits.test.with_transform(view)), torch.tensor(splits.test.targets())
    calib = stacked(splits.val.with_transform(view), calibration)
    with torch.no_grad():
        reference = in_batches(model, test, batch)
        predicted = {"served": in_batches(prepare_for_inference(copy.deepcopy(model), "int8", CPU), test, batch)}
        for name, dynamic in (("pt2e_dynamic", True), ("pt2e_static", False)):
            batches = [calib[i : i + batch] for i in range(0, len(calib) - batch + 1, batch)]
            quantised = pt2e_int8(copy.deepcopy(model), test[:batch], batches, dynamic)
            inductor_config.freezing = True  # PT2E's int8 fusions are freezing passes
            predicted[name] = in_batches(torch.compile(quantised, dynamic=False), test, batch)
            inductor_config.freezing = False
    measures = {"float32_top1": (reference == labels).float().mean().item(), "images": float(len(test))}
    for name, top1 in predicted.items():
        measures[f"{name}_agreement"] = (top1 == reference).float().mean().item()
        measures[f"{name}_top1"] = (top1 == labels).float().mean().item()
    return measures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    parser.add_argument("--data-dir", help="the data folder, when not where the artifacts were trained")
    parser.add_argument("--calibration", type=int, default=1000, help="validation images for the static scales")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json", type=Path, default=Path("results/int8_schemes.json"))
    args = parser.parse_args(argv)
    runs = {}
    for checkpoint in args.checkpoint:
        runs[str(checkpoint)] = measures = schemes(checkpoint, args.data_dir, args.calibration, args.batch_size)
        cells = "  ".join(f"{k} {v:.4f}" for k, v in measures.items() if k != "images")
        print(f"{checkpoint.name} ({measures['images']:.0f} test images): {cells}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
