"""Do bfloat16 and int8 answer what float32 answers? Over seeds (and, through bench/kernels.py, kernel settings).

Each seed trains the tests' digits ViT (tests/conftest.py train_digits_model: 2 blocks, 16x16 digits, 80 % of
scikit-learn's digits, ~20 s on one core) and scores its 360 held-out digits in float32, in bfloat16 both ways it is
run (weights cast, as the service serves it; autocast, as training and `petvit evaluate` score it) and in int8
(torchao, compiled, as PETVIT_DTYPE=int8 serves it): top-1, top-1 agreement with float32, and how faithful the int8
attention rollout stays (tests/model/test_inference.py asserts the same on seed 0).

    .venv/bin/python bench/dtype_agreement.py --seeds 0 1 2 3 4
    .venv/bin/python bench/kernels.py dtype_agreement -- --seeds 0 1 2 3 4   # x the three kernel settings

Prints one line per seed and writes results/dtype_agreement.json (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import machine
from model.inference import prepare_for_inference
from model.rollout import attention_rollout
from model.vit import ViT
from tests.conftest import train_digits_model

CPU = torch.device("cpu")
CLAIMS = {
    "learns": "the digits ViT scores >= 0.90 held-out top-1 in float32",
    "int8_agrees_98": "int8 agrees with float32 on >= 98 % of held-out digits",
    "int8_top1_within_2": "int8 top-1 is within 2 points of float32's",
    "bf16_cast_agrees_99": "bfloat16 (weights cast, as served) agrees with float32 on >= 99 %",
    "bf16_autocast_agrees_99": "bfloat16 (autocast, as evaluated) agrees with float32 on >= 99 %",
    "int8_rollout_faithful": "int8 rollout: max abs difference < 0.05, correlation > 0.99, same hottest patch >= 95 %",
}


def measure(seed: int) -> dict[str, Any]:
    model, images, labels = train_digits_model(seed=seed)
    with torch.inference_mode():
        measures = compare(model, images, labels)
    return {"seed": seed, "measures": measures, "claims": claims(measures)}


def compare(model: ViT, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """float32 against bfloat16 (cast, autocast) and int8: top-1, agreement, and the int8 rollout's fidelity."""
    int8 = prepare_for_inference(copy.deepcopy(model), "int8", CPU)
    bf16 = prepare_for_inference(copy.deepcopy(model), "bfloat16", CPU)
    logits, attention = model.forward_with_attention(images)
    reference = logits.argmax(-1)
    int8_logits, int8_attention = int8.forward_with_attention(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(images).argmax(-1)
    predicted = {"int8": int8_logits.argmax(-1), "bf16_cast": bf16(images).argmax(-1), "bf16_autocast": autocast}
    measures = {"float32_top1": (reference == labels).float().mean().item()}
    for name, p in predicted.items():
        measures[f"{name}_top1"] = (p == labels).float().mean().item()
        measures[f"{name}_agreement"] = (p == reference).float().mean().item()
    side = model.config.image_size // model.config.patch_size  # the patch grid: 4 for the digits ViT, 7 for Fashion
    ref = attention_rollout(attention, grid=(side, side)).flatten(1)  # (N, side, side) -> (N, side * side)
    got = attention_rollout(int8_attention, grid=(side, side)).flatten(1)
    correlation = torch.stack([torch.corrcoef(torch.stack([r, g]))[0, 1] for r, g in zip(ref, got, strict=True)])
    measures |= {
        "int8_rollout_max_abs": (ref - got).abs().max().item(),
        "int8_rollout_min_corr": correlation.min().item(),
        "int8_rollout_same_hottest": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
    }
    return measures


def claims(m: dict[str, float]) -> dict[str, bool]:
    faithful = m["int8_rollout_max_abs"] < 0.05 and m["int8_rollout_min_corr"] > 0.99
    return {
        "learns": m["float32_top1"] >= 0.90,
        "int8_agrees_98": m["int8_agreement"] >= 0.98,
        "int8_top1_within_2": m["int8_top1"] >= m["float32_top1"] - 0.02,
        "bf16_cast_agrees_99": m["bf16_cast_agreement"] >= 0.99,
        "bf16_autocast_agrees_99": m["bf16_autocast_agreement"] >= 0.99,
        "int8_rollout_faithful": faithful and m["int8_rollout_same_hottest"] >= 0.95,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("results/dtype_agreement.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for seed in args.seeds:
        tick = time.perf_counter()
        runs.append(measure(seed))
        m = runs[-1]["measures"]
        print(f"seed {seed}: float32 top-1 {m['float32_top1']:.3f}; agreement int8 {m['int8_agreement']:.3f}, "
              f"bf16 cast {m['bf16_cast_agreement']:.3f}, autocast {m['bf16_autocast_agreement']:.3f}; rollout max "
              f"abs {m['int8_rollout_max_abs']:.4f} ({time.perf_counter() - tick:.0f} s)", flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": machine(), "seeds": args.seeds, "claims": CLAIMS, "runs": runs}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
