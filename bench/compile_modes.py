"""Inductor's CPU modes against eager float32, interleaved in one process: is max-autotune (+ freezing) worth it?

    PYTHONPATH=. .venv/bin/python bench/compile_modes.py --variant b16 --batch-size 16
    PYTHONPATH=. .venv/bin/python bench/compile_modes.py --variant s16 --forwards int8:default:0 int8:max-autotune:1

Each forward is DTYPE:MODE:FREEZE (dtype float32, bfloat16, int8 or int8-bf16: int8 Linear layers with the rest
in bfloat16, int8-pt2e / int8-pt2e-static: bench/pt2e.py's export quantisation, dynamic / calibrated on the timed
batch, which needs FREEZE 1; mode "default", "max-autotune", ...; freeze 0/1 sets
torch._inductor.config.freezing for that compilation, which folds the weights in as constants). Each one is
compiled in turn (its compile time printed), then every forward runs once per round, `--rounds` times, so machine
noise lands on all of them alike. Figures are images per CPU-second (process time: the contention-proof figure on
a shared machine), medians over rounds. Writes results/compile_modes.{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.pt2e import pt2e_int8
from model.config import get_config
from model.inference import quantise_int8
from model.vit import ViT


def build(base: ViT, spec: str, images: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """The forward named by `spec` (DTYPE:MODE:FREEZE), compiled and run once; returns it and its compile seconds."""
    dtype, mode, freeze = spec.split(":")
    model = copy.deepcopy(base)
    if dtype in ("bfloat16", "int8-bf16"):  # int8-bf16: int8 Linear layers, everything else in bfloat16
        model = model.to(torch.bfloat16)
    if dtype.startswith("int8-pt2e"):
        if freeze != "1":
            raise SystemExit(f"{spec}: PT2E's int8 fusions are inductor freezing passes; use FREEZE 1")
        model = pt2e_int8(model, images, [images], dynamic=dtype == "int8-pt2e")
    elif dtype.startswith("int8"):
        quantise_int8(model)
    if mode == "eager":
        return model, 0.0
    inductor_config.freezing = freeze == "1"  # read when this model compiles, so each spec gets its own setting
    start = time.perf_counter()
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
    compiled(images)
    return compiled, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--forwards",
        nargs="+",
        default=[
            "float32:eager:0",
            "float32:default:1",
            "float32:max-autotune:1",
            "int8:default:0",
            "int8:max-autotune:1",
        ],
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/compile_modes"), help="path stem for .json/.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = ViT(get_config(args.variant, num_classes=37)).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8)
    forwards, compile_s = {}, {}
    with torch.no_grad():
        for spec in args.forwards:
            forwards[spec], compile_s[spec] = build(base, spec, images)
            print(f"built {spec}: compile {compile_s[spec]:.1f} s", flush=True)
        seconds: dict[str, list[float]] = {spec: [] for spec in forwards}
        for _ in range(args.rounds):
            for spec, forward in forwards.items():
                start = time.process_time()
                forward(images)
                seconds[spec].append(time.process_time() - start)
    rate = {spec: args.batch_size / statistics.median(s) for spec, s in seconds.items()}
    reference = rate.get("float32:eager:0", next(iter(rate.values())))
    print(f"\n{args.variant}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'forward':28s} {'img/CPU-s':>10s} {'x first':>8s} {'compile s':>10s}")
    for spec in forwards:
        print(f"{spec:28s} {rate[spec]:10.2f} {rate[spec] / reference:8.2f} {compile_s[spec]:10.1f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "variant": args.variant,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "img_per_cpu_s": rate,
        "compile_s": compile_s,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(rate), list(rate.values()), color="#4c72b0")
    ax.set_xlabel("images per CPU-second (median)")
    ax.set_title(f"{args.variant}, batch {args.batch_size}: inductor modes on CPU")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
