"""Load test: `petvit serve` under concurrency 1..64 vs the raw model in-process, batching on/off, heatmaps on/off,
in one or several dtypes, compiled or not.

    .venv/bin/python bench/service_load.py                       # short default run (CPU box shared: ~1-2 min)
    .venv/bin/python bench/service_load.py --variant b16 --concurrency 1 8 32 64 --seconds 15
    .venv/bin/python bench/service_load.py --variant b16 --dtypes float32 bfloat16 int8 --concurrency 16 --seconds 6

Starts the service as a subprocess on a loopback port with a random-init artifact (PETVIT_DTYPE and PETVIT_COMPILE
set from --dtypes and --compile), sends real JPEGs (chelsea, resized/cropped to realistic phone-export sizes around
500x375), and prints img/s, p50/p95/p99 latency and the mean batch size (from /metrics). In the same run it times the
model alone at the same max batch size, in the same dtype and compiled the same way (the service's own Classifier),
which is the ceiling the service is measured against. With several dtypes, each is run in turn and compared with the
first. Before any of it, the same process measures each dtype's matrix-multiply peak (bench/matmul_peak.py's
measurement) and reports every img/s also as a fraction of that dtype's ceiling: peak ops/s over the model's
operations per image (ViT.flops_per_image). With the comparisons on, 12 MP phone photos (4032x3024) are posted too,
with and without the heatmap PNG, and the mean response size is reported. Writes results/service_load.png and
results/service_load.json.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.matmul_peak import time_matmul  # noqa: E402
from model.config import get_config  # noqa: E402
from model.export import export_artifact  # noqa: E402
from model.inference import Classifier  # noqa: E402
from model.precision import INFERENCE_DTYPE_CHOICES, auto_dtype, canonical_dtype, dtype_name  # noqa: E402
from model.vit import ViT  # noqa: E402

PHONE_SIZE = (4032, 3024)  # a 12 MP phone camera's photo, landscape


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


def make_phone_jpegs(count: int = 4, seed: int = 1) -> list[bytes]:
    """Chelsea crops scaled to a 12 MP phone photo (4032x3024), JPEG quality 90: the decode, the resize and the
    heatmap overlay of a real phone upload, whatever its content."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = Image.fromarray(np.asarray(data.chelsea()))
    jpegs = []
    for _ in range(count):
        left, top = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        image = photo.crop((left, top, left + 400, top + 300)).resize(PHONE_SIZE, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def ceilings(names: list[str], variant: str, size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per dtype name (as the runs resolve it: "auto" -> bfloat16 or float32): the matmul peak in ops/s on this
    process's device and the images/s it allows, peak / ViT.flops_per_image (int8 counts integer ops alike)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):  # only the config's arithmetic is needed, not weights
        flops = ViT(get_config(variant)).flops_per_image()
    table = {}
    for name in names:
        try:
            ops = time_matmul(name, size, device, repeats, warmup=2)
        except RuntimeError as err:  # an int8 kernel this build or device lacks: no ceiling to report
            print(f"matmul peak {name}: not available ({err})")
            continue
        table[name] = {"peak_ops_per_s": ops, "flops_per_image": flops, "ceiling_img_per_s": ops / flops}
        print(f"matmul peak {name:>9}: {ops / 1e12:7.3f} T(FL)OP/s at {size}^3 -> ceiling {ops / flops:8.2f} img/s")
    return table


def resolved_name(dtype: str) -> str:
    """The dtype a run computes in, by the same rule the service uses ("auto" -> bfloat16 or float32)."""
    if dtype != "auto":
        return dtype
    return dtype_name(auto_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        artifact: Path,
        max_batch_size: int,
        max_wait_ms: float,
        torch_threads: int = 0,
        dtype: str = "auto",
        compile: bool = False,
        cpus: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PETVIT_CHECKPOINT": str(artifact),
            "PETVIT_DTYPE": dtype,
            "PETVIT_COMPILE": "1" if compile else "0",
            "PETVIT_MAX_BATCH_SIZE": str(max_batch_size),
            "PETVIT_MAX_WAIT_MS": str(max_wait_ms),
            "PETVIT_QUEUE_LIMIT": "1024",
            "PETVIT_TORCH_THREADS": str(torch_threads),
            "PETVIT_LOG_LEVEL": "warning",
            "PETVIT_REQUEST_TIMEOUT_S": "600",  # measure throughput, not the deadline, on a slow shared CPU
        }
        cmd = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if cpus:  # keep the service off the load generators' cores (GPU runs: --server-cpus / --client-cpus)
            cmd = ["taskset", "-c", cpus, *cmd]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 3600) -> float:
        """Seconds until /readyz said 200 and the service runs at full speed: with PETVIT_COMPILE or int8 the eager
        model is ready at once and the compiled one takes over later (full_speed; compiling b16 with a cold cache on
        2 cores takes many minutes)."""
        start = time.monotonic()
        while time.monotonic() < start + timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"petvit serve exited with {self.process.returncode}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200 and full_speed(self.url):
                    return time.monotonic() - start
                if ready.json().get("error", {}).get("message", "").startswith("could not load"):
                    raise RuntimeError(ready.json()["error"]["message"])
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError("petvit serve did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def full_speed(url: str) -> bool:
    """Whether a ready service serves its final model: not still compiling one behind the eager model (/v1/model's
    `compile`; app/lifecycle.py), which would measure eager int8 and a compile sharing the cores."""
    return httpx.get(f"{url}/v1/model", timeout=2).json().get("compile") != "compiling"


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


async def _drive(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float, heatmap: bool, png: bool
) -> tuple[list[float], dict[int, int], float, float]:
    """`concurrency` closed-loop clients posting JPEGs for `seconds`: (latencies of 200s, errors by status, elapsed,
    mean response bytes)."""
    latencies: list[float] = []
    sizes: list[int] = []  # response bytes of the 200s
    errors: dict[int, int] = {}
    stop_at = time.monotonic() + seconds

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
                sizes.append(len(response.content))
            else:
                errors[response.status_code] = errors.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
        return latencies, errors, time.perf_counter() - start, float(np.mean(sizes)) if sizes else float("nan")


def _client_process(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float, heatmap: bool, png: bool, cpus: list[int] | None
) -> tuple[list[float], dict[int, int], float, float, float]:
    """One load-generator process (one Python event loop tops out near a thousand requests a second): its results
    and the CPU seconds it used, so a report can show the generators did not starve the server."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    cpu_start = time.process_time()
    latencies, errors, elapsed, size = asyncio.run(_drive(url, jpegs, concurrency, seconds, heatmap, png))
    return latencies, errors, elapsed, size, time.process_time() - cpu_start


def parse_cpus(text: str | None) -> list[int] | None:
    """ "6-15" or "0,2,4-7" -> the CPU numbers; None stays None."""
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


async def load(
    server: Server,
    jpegs: list[bytes],
    concurrency: int,
    seconds: float,
    heatmap: bool,
    png: bool = True,
    clients: int = 1,
    client_cpus: list[int] | None = None,
) -> dict:
    """The service under `concurrency` closed-loop clients, spread over `clients` processes (1: this one)."""
    url = server.url
    before = batch_stats(url)
    cpu_before = cpu_seconds(server.process.pid)
    if clients <= 1:
        client_cpu_start = time.process_time()
        latencies, errors, elapsed, response_bytes = await _drive(url, jpegs, concurrency, seconds, heatmap, png)
        client_cpu = time.process_time() - client_cpu_start
    else:
        shares = [concurrency // clients + (k < concurrency % clients) for k in range(clients)]
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(clients) as pool:
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _client_process, url, jpegs, n, seconds, heatmap, png, client_cpus)
                    for n in shares
                    if n > 0
                )
            )
        latencies = [x for part in parts for x in part[0]]
        errors = {}
        for part in parts:
            for status, count in part[1].items():
                errors[status] = errors.get(status, 0) + count
        elapsed, client_cpu = max(part[2] for part in parts), sum(part[4] for part in parts)
        response_bytes = float(np.nanmean([part[3] for part in parts]))
    after = batch_stats(url)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    batches = after[1] - before[1]
    return {
        "concurrency": concurrency,
        "clients": clients,
        "heatmap": heatmap,
        "images": len(latencies),
        "errors": errors,
        "img_per_s": len(latencies) / elapsed,
        "img_per_cpu_s": len(latencies) / cpu if cpu > 0 else float("nan"),
        "server_cpu_s": cpu,
        "client_cpu_s": client_cpu,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": (after[0] - before[0]) / batches if batches else float("nan"),
        "mean_response_bytes": response_bytes,
    }


def raw_model_throughput(
    predictor: Classifier, batch_size: int, seconds: float, heatmap: bool = False
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


def plot(runs: dict[str, dict], out: Path) -> None:
    """One row of three panels per dtype: wall-clock and per-CPU-second throughput against the raw model, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(runs), 3, figsize=(16, 4.2 * len(runs)), squeeze=False)
    for axes, (dtype, results) in zip(grid, runs.items(), strict=True):
        plot_row(axes, dtype, results)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_row(axes, dtype: str, results: dict) -> None:
    sweep = results["sweep"]
    c = [r["concurrency"] for r in sweep]
    name = f"{results['variant']} {dtype}{' compiled' if results['compiled'] else ''}, {results['threads']} thread(s)"
    for ax, key, raw_key, title in (
        (axes[0], "img_per_s", "raw_img_per_s", "wall-clock (what a client sees)"),
        (axes[1], "img_per_cpu_s", "raw_img_per_cpu_s", "per CPU-second (contention-proof)"),
    ):
        ax.plot(c, [r[key] for r in sweep], "o-", label="service, batching on")
        ax.axhline(results[raw_key], color="k", ls="--", label=f"raw model, batch {results['max_batch_size']}")
        if key == "img_per_s" and "ceiling_img_per_s" in results:
            q = results["ratios"]
            ax.axhline(
                results["ceiling_img_per_s"],
                color="r",
                ls=":",
                label=f"{dtype} ceiling (service {q['service_over_ceiling']:.2f}, raw {q['raw_over_ceiling']:.2f})",
            )
        for extra, marker, label in (
            ("batching_off", "s", "batching off"),
            ("heatmap_on", "^", "heatmap + PNG"),
            ("heatmap_grid_only", "v", "heatmap grid only"),
            ("phone_plain", "D", "12 MP phone photos"),
            ("phone_heatmap", "P", "12 MP phone photos, heatmap + PNG"),
        ):
            if (r := results.get(extra)) is not None:
                ax.plot([r["concurrency"]], [r[key]], marker, label=f"service, {label}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s" if key == "img_per_s" else "images / CPU-second")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.legend(fontsize=7)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        axes[2].plot(c, [r[q] for r in sweep], "o-", label=q.removesuffix("_ms"))
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("concurrent clients")
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_title(f"{name}: latency, batching on (shared CPU: noisy)", fontsize=9)
    axes[2].legend()


def describe(name: str, r: dict) -> str:
    errors = ", ".join(f"{n}x{code}" for code, n in r["errors"].items()) or "none"
    return (
        f"{name:>16}: {r['img_per_s']:6.2f} img/s  {r['img_per_cpu_s']:5.2f} img/cpu-s  p50 {r['p50_ms']:8.0f}  "
        f"p95 {r['p95_ms']:8.0f}  p99 {r['p99_ms']:8.0f} ms  mean batch {r['mean_batch']:5.1f}  errors {errors}  "
        f"cpu s server {r['server_cpu_s']:.1f} load generator {r['client_cpu_s']:.1f}"
    )


def parse_args() -> argparse.Namespace:
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
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=INFERENCE_DTYPE_CHOICES,
        default=["auto"],
        help="PETVIT_DTYPE for each run, in turn; the first is the baseline the others are compared with",
    )
    parser.add_argument("--compile", action="store_true", help="PETVIT_COMPILE=1 (int8 always compiles)")
    parser.add_argument(
        "--no-comparisons",
        dest="comparisons",
        action="store_false",
        help="only the concurrency sweep: skip the heatmap and batching-off runs (several dtypes on a slow CPU)",
    )
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes sharing the concurrency")
    parser.add_argument("--server-cpus", help="taskset CPU list for the service, e.g. 0-5")
    parser.add_argument("--client-cpus", help="CPU list for the load-generator processes, e.g. 6-15")
    parser.add_argument("--peak-size", type=int, help="matmul side for the ceilings (default 8192 CUDA, 2048 CPU)")
    parser.add_argument("--peak-repeats", type=int, default=5, help="timed matmuls per dtype for the ceilings")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    return parser.parse_args()


def serve_and_load(args: argparse.Namespace, artifact: Path, jpegs: list[bytes], dtype: str) -> dict:
    """The service in `dtype`: the concurrency sweep, then (unless --no-comparisons) heatmaps, phone photos and
    batching off."""
    results: dict = {"sweep": []}
    server = Server(
        artifact, args.max_batch_size, args.max_wait_ms, args.torch_threads, dtype, args.compile, args.server_cpus
    )
    try:
        results["start_s"] = server.wait_ready()
        print(f"{dtype}: service ready in {results['start_s']:.1f} s (load + warm-up, compiling when compiled)")
        for c in args.concurrency:
            r = asyncio.run(
                load(server, jpegs, c, args.seconds, False, True, args.clients, parse_cpus(args.client_cpus))
            )
            results["sweep"].append(r)
            print(describe(f"concurrency {c}", r))
        if not args.comparisons:
            return results
        at = args.compare_at
        results["heatmap_off"] = asyncio.run(load(server, jpegs, at, args.seconds, heatmap=False))
        print(describe(f"plain @{at}", results["heatmap_off"]))
        results["heatmap_on"] = asyncio.run(load(server, jpegs, at, args.seconds, heatmap=True))
        print(describe(f"heatmap @{at}", results["heatmap_on"]))
        results["heatmap_grid_only"] = asyncio.run(load(server, jpegs, at, args.seconds, heatmap=True, png=False))
        print(describe(f"grid only @{at}", results["heatmap_grid_only"]))
        phones = make_phone_jpegs()
        for key, heatmap, png in (("phone_plain", False, False), ("phone_heatmap", True, True)):
            results[key] = asyncio.run(load(server, phones, at, args.seconds, heatmap=heatmap, png=png))
            print(describe(f"{key.replace('_', ' ')} @{at}", results[key]))
    finally:
        server.stop()
    server = Server(artifact, 1, 0, args.torch_threads, dtype, args.compile)
    try:
        server.wait_ready()
        results["batching_off"] = asyncio.run(load(server, jpegs, args.compare_at, args.seconds, heatmap=False))
        print(describe(f"no batching @{args.compare_at}", results["batching_off"]))
    finally:
        server.stop()
    return results


def run_dtype(args: argparse.Namespace, artifact: Path, jpegs: list[bytes], dtype: str, ceiling: dict) -> dict:
    """The raw model and the service, both in `dtype` (and compiled alike), with their ratios (to each other and to
    `ceiling`, this dtype's matmul-peak ceiling; empty when the device has no kernel for it)."""
    # The service's own Classifier, in the same dtype and compiled the same way, loaded once for the raw timings.
    predictor = Classifier.from_artifact(artifact, "auto", dtype, args.compile, args.max_batch_size)
    results: dict = {"variant": args.variant, "max_batch_size": args.max_batch_size, "threads": torch.get_num_threads()}
    results |= {"dtype": predictor.dtype_name, "compiled": predictor.compiled}
    raw = [raw_model_throughput(predictor, args.max_batch_size, args.seconds)]
    raw_map = raw_model_throughput(predictor, args.max_batch_size, args.seconds, heatmap=True)
    results |= serve_and_load(args, artifact, jpegs, dtype)
    # The CPU is shared: time the model alone again after the sweep and keep the better figures (the ceiling).
    raw.append(raw_model_throughput(predictor, args.max_batch_size, args.seconds))
    results["raw_img_per_s"] = max(r[0] for r in raw)
    results["raw_img_per_cpu_s"] = max(r[1] for r in raw)
    results["raw_heatmap_img_per_s"], results["raw_heatmap_img_per_cpu_s"] = raw_map
    results |= ceiling
    results["ratios"] = ratios(results)
    report(args, results)
    return results


def ratios(results: dict) -> dict[str, float]:
    best = max(results["sweep"], key=lambda r: r["img_per_s"])
    best_cpu = max(results["sweep"], key=lambda r: r["img_per_cpu_s"])
    q = {
        "service_over_raw_wall": best["img_per_s"] / results["raw_img_per_s"],
        "service_over_raw_cpu": best_cpu["img_per_cpu_s"] / results["raw_img_per_cpu_s"],
    }
    if "ceiling_img_per_s" in results:  # wall-clock: the peak is a wall-clock figure on the same threads
        q["service_over_ceiling"] = best["img_per_s"] / results["ceiling_img_per_s"]
        q["raw_over_ceiling"] = results["raw_img_per_s"] / results["ceiling_img_per_s"]
    if "batching_off" not in results:
        return q
    on, off = results["heatmap_off"], results["batching_off"]
    for name, r in (("heatmap", results["heatmap_on"]), ("heatmap_grid_only", results["heatmap_grid_only"])):
        q[f"{name}_over_plain_wall"] = r["img_per_s"] / on["img_per_s"]
        q[f"{name}_over_plain_cpu"] = r["img_per_cpu_s"] / on["img_per_cpu_s"]
    q["phone_heatmap_over_plain_wall"] = results["phone_heatmap"]["img_per_s"] / results["phone_plain"]["img_per_s"]
    q["batching_on_over_off_wall"] = on["img_per_s"] / off["img_per_s"]
    q["batching_on_over_off_cpu"] = on["img_per_cpu_s"] / off["img_per_cpu_s"]
    return q


def report(args: argparse.Namespace, results: dict) -> None:
    q, best = results["ratios"], max(results["sweep"], key=lambda r: r["img_per_s"])
    print(
        f"raw model {args.variant} {results['dtype']}{' compiled' if results['compiled'] else ''} at batch "
        f"{args.max_batch_size}: {results['raw_img_per_s']:.2f} img/s, {results['raw_img_per_cpu_s']:.2f} img/cpu-s "
        f"(explicit-attention path {results['raw_heatmap_img_per_s']:.2f} img/s)"
    )
    print(
        f"service / raw model: {q['service_over_raw_wall']:.2f}x wall-clock (best level, concurrency "
        f"{best['concurrency']}), {q['service_over_raw_cpu']:.2f}x per CPU-second (goal >= 0.90)"
    )
    if "service_over_ceiling" in q:
        print(
            f"of the {results['dtype']} ceiling ({results['ceiling_img_per_s']:.2f} img/s): service "
            f"{q['service_over_ceiling']:.2f}, raw model {q['raw_over_ceiling']:.2f}"
        )
    if "batching_on_over_off_wall" not in q:
        return
    print(
        f"heatmap on / off: {q['heatmap_over_plain_wall']:.2f}x wall, {q['heatmap_over_plain_cpu']:.2f}x per "
        f"CPU-second (goal >= 0.85)"
    )
    print(
        f"heatmap grid only (heatmap_png=false) / off: {q['heatmap_grid_only_over_plain_wall']:.2f}x wall, "
        f"{q['heatmap_grid_only_over_plain_cpu']:.2f}x per CPU-second"
    )
    phone, phone_map = results["phone_plain"], results["phone_heatmap"]
    print(
        f"phone photos {PHONE_SIZE[0]}x{PHONE_SIZE[1]}: {phone['img_per_s']:.2f} img/s plain, "
        f"{phone_map['img_per_s']:.2f} with heatmap + PNG ({q['phone_heatmap_over_plain_wall']:.2f}x); mean answer "
        f"{phone['mean_response_bytes'] / 1e3:.1f} kB plain, {phone_map['mean_response_bytes'] / 1e3:.1f} kB with it"
    )
    print(
        f"batching on / off: {q['batching_on_over_off_wall']:.2f}x wall, {q['batching_on_over_off_cpu']:.2f}x per CPU-s"
    )


def compare_dtypes(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each dtype against the first: raw model and best service level, wall-clock and per CPU-second."""
    base_name, base = next(iter(runs.items()))
    table = {}
    print(f"\n{'dtype':>10} {'start s':>8} {'ceil img/s':>10} {'raw img/s':>10} {'raw /cpu-s':>10} {'svc img/s':>10} "
          f"{'svc /cpu-s':>10} {'svc/raw':>8} {'raw/ceil':>8} {'svc/ceil':>8} {'raw x ' + base_name:>16} "
          f"{'svc x ' + base_name:>16}")  # fmt: skip
    for name, r in runs.items():
        svc = max(s["img_per_s"] for s in r["sweep"])
        svc_cpu = max(s["img_per_cpu_s"] for s in r["sweep"])
        base_svc = max(s["img_per_s"] for s in base["sweep"])
        row = {
            "raw_over_baseline_wall": r["raw_img_per_s"] / base["raw_img_per_s"],
            "raw_over_baseline_cpu": r["raw_img_per_cpu_s"] / base["raw_img_per_cpu_s"],
            "service_over_baseline_wall": svc / base_svc,
            "service_over_baseline_cpu": svc_cpu / max(s["img_per_cpu_s"] for s in base["sweep"]),
        }
        table[name] = row
        q, nan = r["ratios"], float("nan")
        print(
            f"{name:>10} {r['start_s']:8.1f} {r.get('ceiling_img_per_s', nan):10.2f} {r['raw_img_per_s']:10.2f} "
            f"{r['raw_img_per_cpu_s']:10.2f} {svc:10.2f} {svc_cpu:10.2f} {q['service_over_raw_wall']:8.2f} "
            f"{q.get('raw_over_ceiling', nan):8.2f} {q.get('service_over_ceiling', nan):8.2f} "
            f"{row['raw_over_baseline_wall']:16.2f} {row['service_over_baseline_wall']:16.2f}"
        )
    return table


def main() -> int:
    args = parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs()
    runs: dict[str, dict] = {}
    dtypes = list(dict.fromkeys(canonical_dtype(d) for d in args.dtypes))  # each once, in the order given
    # The ceilings first, in this process, before any service competes for the cores.
    peak_size = args.peak_size or (8192 if torch.cuda.is_available() else 2048)
    ceiling = ceilings(list(dict.fromkeys(map(resolved_name, dtypes))), args.variant, peak_size, args.peak_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_artifact(args.variant, Path(tmp) / f"{args.variant}.safetensors", "random")
        for dtype in dtypes:
            print(f"--- {args.variant}, PETVIT_DTYPE={dtype}{', PETVIT_COMPILE=1' if args.compile else ''}")
            runs[dtype] = run_dtype(args, artifact, jpegs, dtype, ceiling.get(resolved_name(dtype), {}))
    results = {"variant": args.variant, "max_batch_size": args.max_batch_size, "compile": args.compile, "runs": runs}
    results |= {"ceilings": ceiling, "peak_size": peak_size}
    results["dtype_ratios"] = compare_dtypes(runs)
    print("figures are noisy: the CPU is shared; the per-CPU-second ratios are the contention-proof ones")
    (args.out / "service_load.json").write_text(json.dumps(results, indent=2))
    plot(runs, args.out / "service_load.png")
    print(f"wrote {args.out / 'service_load.png'} and {args.out / 'service_load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
