"""How long `petvit serve` takes to answer: seconds from start to /readyz 200, and (with PETVIT_COMPILE or int8) to the
compiled model serving, on a cold compile cache (a fresh TORCHINDUCTOR_CACHE_DIR per start).

    PYTHONPATH=. .venv/bin/python bench/ready_time.py --variant ti16 --dtype int8 --torch-threads 1
    # the same against another checkout of the code (e.g. the commit before compiling moved behind the eager model):
    git archive 31e370c | tar -x -C /tmp/before
    PYTHONPATH=. .venv/bin/python bench/ready_time.py --variant ti16 --dtype int8 --checkout /tmp/before

Each start is polled every 0.2 s: /readyz, then /v1/model until its `compile` is no longer `compiling` (a checkout
without that field counts as compiled once ready, as it was). Writes results/ready_time_<variant>_<dtype>.json and a
.png bar chart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.export import export_artifact  # noqa: E402

POLL_S = 0.2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(checkout: Path, artifact: Path, args: argparse.Namespace, cache: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "PETVIT_CHECKPOINT": str(artifact),
        "PETVIT_DEVICE": "cpu",
        "PETVIT_DTYPE": args.dtype,
        "PETVIT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "PETVIT_TORCH_THREADS": str(args.torch_threads),
        "PETVIT_LOG_LEVEL": "warning",
        "TORCHINDUCTOR_CACHE_DIR": str(cache),  # cold: a fresh folder per start
    }
    if args.compile:
        env["PETVIT_COMPILE"] = "1"
    cmd = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=checkout, env=env), f"http://127.0.0.1:{port}"


def poll(process: subprocess.Popen, url: str, timeout_s: float) -> dict[str, float | str | None]:
    """Seconds from start to /readyz 200 and to the compiled model serving (or being refused)."""
    t0 = time.monotonic()
    ready_s: float | None = None
    while time.monotonic() - t0 < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"petvit serve exited with {process.returncode}")
        try:
            if ready_s is None and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                ready_s = time.monotonic() - t0
            if ready_s is not None:
                info = httpx.get(f"{url}/v1/model", timeout=2).json()
                state = info.get("compile", "agreed")  # older checkouts: compiled before ready
                if state != "compiling":
                    return {"ready_s": ready_s, "full_speed_s": time.monotonic() - t0, "compile": state}
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"not settled within {timeout_s} s")


def measure(checkout: Path, artifact: Path, args: argparse.Namespace) -> dict[str, float | str | None]:
    with tempfile.TemporaryDirectory(prefix="petvit-inductor-") as cache:
        process, url = start(checkout, artifact, args, Path(cache))
        try:
            return poll(process, url, args.timeout_s)
        finally:
            process.terminate()
            process.wait(30)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = ["/readyz 200", "compiled serving"]
    ax.barh(labels, [result["ready_s"], result["full_speed_s"]], color=["tab:green", "tab:blue"])
    ax.set_xlabel("seconds from start (cold compile cache)")
    ax.set_title(f"petvit serve {result['variant']} {result['dtype']}: {result['checkout']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="ti16")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--compile", action="store_true", help="PETVIT_COMPILE=1 (int8 compiles anyway)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the code to serve (default: this checkout)")
    parser.add_argument("--timeout-s", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="petvit-ready-") as tmp:
        artifact = export_artifact(args.variant, Path(tmp) / f"{args.variant}.safetensors", "random")
        timing = measure(args.checkout.resolve(), artifact, args)
    result = {"variant": args.variant, "dtype": args.dtype, "checkout": str(args.checkout), **timing}
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ready_time_{args.variant}_{args.dtype}{'_before' if args.checkout.resolve() != ROOT else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
