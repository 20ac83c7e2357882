"""Load test: `petvit serve` under concurrency 1..64 vs the raw model in-process, batching on/off, heatmaps on/off.

    .venv/bin/python bench/service_load.py                       # short default run (CPU box shared: ~1-2 min)
    .venv/bin/python bench/service_load.py --variant b16 --concurrency 1 8 32 64 --seconds 15

Starts the service as a subprocess on a loopback port with a random-init artifact, sends real JPEGs (chelsea,
resized/cropped to realistic phone-export sizes around 500x375), and prints img/s, p50/p95/p99 latency and the mean
batch size (from /metrics). In the same run it times the model alone at the same max batch size, which is the
ceiling the service is measured against. Writes results/service_load.png and results/service_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.predictor import Predictor  # noqa: E402
from model.export import export_artifact  # noqa: E402


def make_jpegs(count: int = 24, seed: int = 0) -> list[bytes]:
    """Chelsea at varied realistic sizes (about 500x375, some portrait, some larger), JPEG quality 85-95."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = Image.fromarray(np.asarray(data.chelsea()))
    jpegs = []
    for _ in range(count):
        w = int(rng.integers(400, 800))
        h = int(w * rng.choice([0.75, 0.667, 1.333, 1.0]))
        left, top = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        image = photo.crop((left, top, left + 400, top + 260)).resize((w, h), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(85, 96)))
        jpegs.append(buffer.getvalue())
    return jpegs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, max_batch_size: int, max_wait_ms: float, torch_threads: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PETVIT_CHECKPOINT": str(artifact),
            "PETVIT_MAX_BATCH_SIZE": str(max_batch_size),
            "PETVIT_MAX_WAIT_MS": str(max_wait_ms),
            "PETVIT_QUEUE_LIMIT": "1024",
            "PETVIT_TORCH_THREADS": str(torch_threads),
            "PETVIT_LOG_LEVEL": "warning",
            "PETVIT_REQUEST_TIMEOUT_S": "600",  # measure throughput, not the deadline, on a slow shared CPU
        }
        cmd = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"petvit serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("petvit serve did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used: on a shared CPU, images per CPU-second is a
    contention-proof measure of efficiency where wall-clock img/s mostly measures the neighbours."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_stats(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return values.get("petvit_batch_size_sum", 0.0), values.get("petvit_batch_size_count", 0.0)


async def load(
    server: Server, jpegs: list[bytes], concurrency: int, seconds: float, heatmap: bool, png: bool = True
) -> dict:
    url = server.url
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop_at = time.monotonic() + seconds
    before = batch_stats(url)
    cpu_before = cpu_seconds(server.process.pid)

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.monotonic() < stop_at:
            data = jpegs[i % len(jpegs)]
            i += concurrency
            start = time.perf_counter()
            response = await client.post(
                "/classify",
                content=data,
                headers={"Content-Type": "image/jpeg"},
                params={"heatmap": str(heatmap).lower(), "heatmap_png": str(png).lower(), "top_k": 5},
            )
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[response.status_code] = errors.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    after = batch_stats(url)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    batches = after[1] - before[1]
    return {
        "concurrency": concurrency,
        "heatmap": heatmap,
        "images": len(latencies),
        "errors": errors,
        "img_per_s": len(latencies) / elapsed,
        "img_per_cpu_s": len(latencies) / cpu if cpu > 0 else float("nan"),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": (after[0] - before[0]) / batches if batches else float("nan"),
    }


def raw_model_throughput(
    predictor: Predictor, batch_size: int, seconds: float, heatmap: bool = False
) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the model alone on uint8 batches (no HTTP, no decoding): the ceiling.

    The predictor is the service's own (same device and dtype: `auto`, as the served subprocess uses), timed on
    its forward pass alone."""
    size = predictor.image_size
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=predictor.device)

    def sync() -> None:
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)

    with torch.inference_mode():
        predictor.forward(x, heatmap)  # warm-up
        sync()
        count, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds or count < 3 * batch_size:
            predictor.forward(x, heatmap)
            count += batch_size
        sync()
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    c = [r["concurrency"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, key, raw_key, title in (
        (axes[0], "img_per_s", "raw_img_per_s", "wall-clock (what a client sees)"),
        (axes[1], "img_per_cpu_s", "raw_img_per_cpu_s", "per CPU-second (contention-proof)"),
    ):
        ax.plot(c, [r[key] for r in sweep], "o-", label="service, batching on")
        ax.axhline(results[raw_key], color="k", ls="--", label=f"raw model, batch {results['max_batch_size']}")
        for name, marker, label in (
            ("batching_off", "s", "batching off"),
            ("heatmap_on", "^", "heatmap + PNG"),
            ("heatmap_grid_only", "v", "heatmap grid only"),
        ):
            r = results[name]
            ax.plot([r["concurrency"]], [r[key]], marker, label=f"service, {label}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s" if key == "img_per_s" else "images / CPU-second")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{results['variant']}, {results['threads']} torch thread(s): {title}", fontsize=9)
        ax.legend(fontsize=7)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        axes[2].plot(c, [r[q] for r in sweep], "o-", label=q.removesuffix("_ms"))
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("concurrent clients")
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_title("latency, batching on (shared CPU: noisy)", fontsize=9)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def describe(name: str, r: dict) -> str:
    errors = ", ".join(f"{n}x{code}" for code, n in r["errors"].items()) or "none"
    return (
        f"{name:>16}: {r['img_per_s']:6.2f} img/s  {r['img_per_cpu_s']:5.2f} img/cpu-s  p50 {r['p50_ms']:8.0f}  "
        f"p95 {r['p95_ms']:8.0f}  p99 {r['p99_ms']:8.0f} ms  mean batch {r['mean_batch']:5.1f}  errors {errors}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b32")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--compare-at", type=int, default=16, help="concurrency for heatmap / batching-off runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load level")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads for the model, here and in the service (0: default)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs()
    results: dict = {"variant": args.variant, "max_batch_size": args.max_batch_size, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_artifact(args.variant, Path(tmp) / f"{args.variant}.safetensors", "random")
        predictor = Predictor.from_artifact(artifact)  # loaded once for the three raw timings
        raw = [raw_model_throughput(predictor, args.max_batch_size, args.seconds)]
        raw_map = raw_model_throughput(predictor, args.max_batch_size, args.seconds, heatmap=True)
        server = Server(artifact, args.max_batch_size, args.max_wait_ms, args.torch_threads)
        try:
            server.wait_ready()
            results["sweep"] = []
            for c in args.concurrency:
                r = asyncio.run(load(server, jpegs, c, args.seconds, heatmap=False))
                results["sweep"].append(r)
                print(describe(f"concurrency {c}", r))
            plain = asyncio.run(load(server, jpegs, args.compare_at, args.seconds, heatmap=False))
            print(describe(f"plain @{args.compare_at}", plain))
            results["heatmap_off"] = plain
            results["heatmap_on"] = asyncio.run(load(server, jpegs, args.compare_at, args.seconds, heatmap=True))
            print(describe(f"heatmap @{args.compare_at}", results["heatmap_on"]))
            grid = asyncio.run(load(server, jpegs, args.compare_at, args.seconds, heatmap=True, png=False))
            results["heatmap_grid_only"] = grid
            print(describe(f"grid only @{args.compare_at}", grid))
        finally:
            server.stop()
        server = Server(artifact, 1, 0, args.torch_threads)
        try:
            server.wait_ready()
            results["batching_off"] = asyncio.run(load(server, jpegs, args.compare_at, args.seconds, heatmap=False))
            print(describe(f"no batching @{args.compare_at}", results["batching_off"]))
        finally:
            server.stop()
        # The CPU is shared: time the model alone again after the sweep and keep the better figures (the ceiling).
        raw.append(raw_model_throughput(predictor, args.max_batch_size, args.seconds))
    results["raw_img_per_s"] = max(r[0] for r in raw)
    results["raw_img_per_cpu_s"] = max(r[1] for r in raw)
    results["raw_heatmap_img_per_s"], results["raw_heatmap_img_per_cpu_s"] = raw_map
    best = max(results["sweep"], key=lambda r: r["img_per_s"])
    best_cpu = max(results["sweep"], key=lambda r: r["img_per_cpu_s"])
    on, off, maps = plain, results["batching_off"], results["heatmap_on"]
    results["ratios"] = {
        "service_over_raw_wall": best["img_per_s"] / results["raw_img_per_s"],
        "service_over_raw_cpu": best_cpu["img_per_cpu_s"] / results["raw_img_per_cpu_s"],
        "heatmap_over_plain_wall": maps["img_per_s"] / on["img_per_s"],
        "heatmap_over_plain_cpu": maps["img_per_cpu_s"] / on["img_per_cpu_s"],
        "heatmap_grid_only_over_plain_wall": grid["img_per_s"] / on["img_per_s"],
        "heatmap_grid_only_over_plain_cpu": grid["img_per_cpu_s"] / on["img_per_cpu_s"],
        "batching_on_over_off_wall": on["img_per_s"] / off["img_per_s"],
        "batching_on_over_off_cpu": on["img_per_cpu_s"] / off["img_per_cpu_s"],
    }
    q = results["ratios"]
    print(
        f"raw model {args.variant} at batch {args.max_batch_size}: {results['raw_img_per_s']:.2f} img/s, "
        f"{results['raw_img_per_cpu_s']:.2f} img/cpu-s (explicit-attention path {raw_map[0]:.2f} img/s)"
    )
    print(
        f"service / raw model: {q['service_over_raw_wall']:.2f}x wall-clock (best level, concurrency "
        f"{best['concurrency']}), {q['service_over_raw_cpu']:.2f}x per CPU-second (goal >= 0.90)"
    )
    print(
        f"heatmap on / off: {q['heatmap_over_plain_wall']:.2f}x wall, {q['heatmap_over_plain_cpu']:.2f}x per "
        f"CPU-second (goal >= 0.85)"
    )
    print(
        f"heatmap grid only (heatmap_png=false) / off: {q['heatmap_grid_only_over_plain_wall']:.2f}x wall, "
        f"{q['heatmap_grid_only_over_plain_cpu']:.2f}x per CPU-second"
    )
    print(
        f"batching on / off: {q['batching_on_over_off_wall']:.2f}x wall, {q['batching_on_over_off_cpu']:.2f}x per CPU-s"
    )
    print("figures are noisy: the CPU is shared; the per-CPU-second ratios are the contention-proof ones")
    (args.out / "service_load.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "service_load.png")
    print(f"wrote {args.out / 'service_load.png'} and {args.out / 'service_load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
