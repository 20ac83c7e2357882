"""Overload: does the service keep its goodput at 10x its capacity with a short deadline?

    .venv/bin/python bench/overload.py                                   # s16, 2 s deadline, ~2-3 min on 2 cores
    .venv/bin/python bench/overload.py --variant b16 --deadline-s 3 --overload 10 --seconds 40

Starts `petvit serve` (random-init artifact of --variant, one torch thread) pinned to --server-cpus, and drives it
from this process pinned to --client-cpus, with a small asyncio HTTP/1.1 client (one connection per request, as
callers that time out behave) so the load generator costs little CPU. Two phases:

1. capacity: --concurrency closed-loop clients at the service's own pace; capacity = images answered per second,
   measured before the overload and again after it (the mean counts: neighbours on a shared CPU come and go).
2. overload: open-loop Poisson arrivals at --overload x capacity requests/s (one JPEG each) for --seconds; every
   caller gives up (closes its connection) at the deadline + 1 s, as real callers do.

Reports goodput (200s within the deadline that completed inside the phase, per second) / capacity (target >= 0.9),
the p99 latency of the admitted (200) requests against the deadline, 429 and 504 counts, what the service counted
(rejections by reason, dropped images) and the CPU seconds of the server and of the load generator; and the same
ratio per server CPU-second (good answers per CPU-second the server got, against the same at its own pace), which
neighbours on a shared CPU do not move.
Writes results/overload.{png,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from service_load import cpu_seconds, free_port, full_speed, make_jpegs, parse_cpus  # noqa: E402

from model.export import export_artifact  # noqa: E402


@dataclass
class Outcome:
    sent: float  # seconds since the phase began
    status: int  # 0: the caller gave up (its timeout) or the connection failed
    latency_s: float
    retry_after: int | None = None


# ------------------------------------------------------------------------------------------------ the load generator
async def request(host: str, port: int, body: bytes, timeout_s: float, t0: float) -> Outcome:
    """One POST /classify on its own connection; the caller closes it at timeout_s, as a caller that gives up does."""
    sent = time.monotonic()
    head = (
        f"POST /classify?top_k=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head + body)
            status_line = await reader.readline()
            headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            length = int(headers.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in headers else 0
            await reader.readexactly(length)
        status = int(status_line.split()[1])
        retry = headers.split("retry-after:")[1].split("\r\n")[0].strip() if "retry-after:" in headers else None
        return Outcome(sent - t0, status, time.monotonic() - sent, int(retry) if retry else None)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        return Outcome(sent - t0, 0, time.monotonic() - sent)
    finally:
        if writer is not None:
            writer.close()


async def closed_loop(url: str, jpegs: list[bytes], concurrency: int, seconds: float, timeout_s: float) -> list:
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    outcomes: list[Outcome] = []

    async def client(k: int) -> None:
        i = k
        while time.monotonic() - t0 < seconds:
            outcomes.append(await request(host, int(port), jpegs[i % len(jpegs)], timeout_s, t0))
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return outcomes


async def open_loop(
    url: str, jpegs: list[bytes], rate: float, seconds: float, timeout_s: float, at_end: Callable[[], None]
) -> list:
    """Poisson arrivals at `rate` requests/s for `seconds`, each on its own task: nobody waits for an answer before
    sending the next, so the offered load stays `rate` whatever the service does. at_end() is called when the
    phase's `seconds` are over (the answers still due come after)."""
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(0)
    t0 = time.monotonic()
    tasks, at, i = [], 0.0, 0
    while at < seconds:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(host, int(port), jpegs[i % len(jpegs)], timeout_s, t0)))
        at += rng.expovariate(rate)
        i += 1
    await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
    at_end()
    return list(await asyncio.gather(*tasks))


# ------------------------------------------------------------------------------------------------------ the service
def start_server(artifact: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PETVIT_CHECKPOINT": str(artifact),
        "PETVIT_DTYPE": args.dtype,
        "PETVIT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "PETVIT_MAX_WAIT_MS": str(args.max_wait_ms),
        "PETVIT_QUEUE_LIMIT": str(args.queue_limit),
        "PETVIT_REQUEST_TIMEOUT_S": str(args.deadline_s),
        "PETVIT_TORCH_THREADS": str(args.torch_threads),
        "PETVIT_PREPROCESS_THREADS": "1",
        "PETVIT_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.server_cpus:
        cmd = ["taskset", "-c", args.server_cpus, *cmd]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"petvit serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 and full_speed(url):
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("petvit serve did not become ready")


def service_counts(url: str) -> dict[str, float]:
    """rejected_total by reason and dropped_images_total by reason, as the service counted them."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name in ("petvit_rejected_total", "petvit_dropped_images_total"):
                counts[f"{s.name.removeprefix('petvit_').removesuffix('_total')}.{s.labels['reason']}"] = s.value
    return counts


# ------------------------------------------------------------------------------------------------------- reporting
def summarise(outcomes: list[Outcome], seconds: float, deadline_s: float) -> dict:
    ok = np.array([o.latency_s for o in outcomes if o.status == 200])
    admitted = np.array([o.latency_s for o in outcomes if o.status != 429])
    # goodput: answers within the deadline that *completed* inside the phase (counting by send time would credit
    # the phase with the queue's last deadline's worth of work done after it ended)
    good = sum(o.status == 200 and o.latency_s <= deadline_s and o.sent + o.latency_s <= seconds for o in outcomes)
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    retry = [o.retry_after for o in outcomes if o.status == 429 and o.retry_after is not None]
    return {
        "requests": len(outcomes),
        "offered_per_s": len(outcomes) / seconds,
        "statuses": statuses,
        "goodput_per_s": good / seconds,
        "late_200": int((ok > deadline_s).sum()),
        "p50_admitted_ms": float(np.percentile(ok, 50) * 1000) if len(ok) else float("nan"),
        "p99_admitted_ms": float(np.percentile(ok, 99) * 1000) if len(ok) else float("nan"),
        "max_admitted_ms": float(ok.max() * 1000) if len(ok) else float("nan"),
        # admitted = not refused with 429: their 504s (and callers that gave up) count too, at their latency
        "p99_not_refused_ms": float(np.percentile(admitted, 99) * 1000) if len(admitted) else float("nan"),
        "retry_after_s": {"min": min(retry), "median": float(np.median(retry)), "max": max(retry)} if retry else None,
    }


def plot(results: dict, outcomes: list[Outcome], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    over, deadline_ms = results["overload"], results["deadline_s"] * 1000
    fig, (bars, hist, timeline) = plt.subplots(1, 3, figsize=(17, 4.8))
    names = ["capacity\n(own pace)", "offered\n(overload)", "goodput\n(overload)"]
    values = [results["capacity_img_per_s"], over["offered_per_s"], over["goodput_per_s"]]
    bars.bar(names, values, color=["tab:gray", "tab:orange", "tab:green"])
    bars.set_ylabel("requests (images) / s")
    bars.set_title(f"goodput / capacity = {results['goodput_ratio']:.2f}")
    for x, v in enumerate(values):
        bars.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    admitted = [o.latency_s * 1000 for o in outcomes if o.status == 200]
    hist.hist(admitted, bins=40, color="tab:green")
    hist.axvline(deadline_ms, color="red", linestyle="--", label=f"deadline {deadline_ms:.0f} ms")
    hist.axvline(over["p99_admitted_ms"], color="black", linestyle=":", label=f"p99 {over['p99_admitted_ms']:.0f} ms")
    hist.set_xlabel("latency of admitted (200) requests, ms")
    hist.set_title("admitted requests")
    hist.legend()
    horizon = int(results["seconds"]) + 1
    for status, color in ((200, "tab:green"), (429, "tab:orange"), (504, "tab:red"), (0, "tab:purple")):
        per_s = np.bincount([int(o.sent) for o in outcomes if o.status == status], minlength=horizon)[:horizon]
        timeline.plot(per_s, color=color, label={0: "gave up / failed"}.get(status, str(status)))
    timeline.set_xlabel("second of the overload phase (by send time)")
    timeline.set_ylabel("requests / s")
    timeline.set_title("outcomes over time")
    timeline.legend()
    fig.suptitle(
        f"petvit {results['variant']} at {results['overload_factor']:g}x capacity, {results['deadline_s']:g} s deadline"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(results: dict) -> None:
    over = results["overload"]
    rows = [
        (
            "capacity (own pace)",
            f"{results['capacity_img_per_s']:.2f} img/s (before {results['capacity_before']['img_per_s']:.2f}, "
            f"after {results['capacity_after']['img_per_s']:.2f})",
        ),
        ("offered (overload)", f"{over['offered_per_s']:.1f} req/s ({results['overload_factor']:g}x)"),
        ("goodput (200 within deadline)", f"{over['goodput_per_s']:.2f} img/s"),
        ("goodput / capacity", f"{results['goodput_ratio']:.3f}  (target >= 0.9)"),
        ("the same per server CPU-second", f"{results['goodput_ratio_per_server_cpu_s']:.3f}"),
        (
            "p50 / p99 / max admitted",
            f"{over['p50_admitted_ms']:.0f} / {over['p99_admitted_ms']:.0f} / "
            f"{over['max_admitted_ms']:.0f} ms (deadline {results['deadline_s'] * 1000:.0f} ms)",
        ),
        ("p99 of all not refused (504s too)", f"{over['p99_not_refused_ms']:.0f} ms"),
        ("answers by status", ", ".join(f"{k}: {v}" for k, v in sorted(over["statuses"].items()))),
        ("Retry-After (s)", str(over["retry_after_s"])),
        ("service counted", ", ".join(f"{k}: {v:g}" for k, v in results["service_counts"].items() if v)),
        ("server CPU", f"{results['server_cpu_s']:.1f} s over {results['seconds']:g} s"),
        ("load generator CPU", f"{results['client_cpu_s']:.1f} s ({results['client_cpu_share']:.0%} of one core)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="s16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--deadline-s", type=float, default=2.0, help="PETVIT_REQUEST_TIMEOUT_S")
    parser.add_argument("--overload", type=float, default=10.0, help="offered load / measured capacity")
    parser.add_argument("--seconds", type=float, default=40.0, help="overload phase")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=0, help="capacity phase clients (0: 2 x max batch)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-limit", type=int, default=256)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--server-cpus", default="0" if (os.cpu_count() or 1) > 1 else None)
    parser.add_argument("--client-cpus", default="1" if (os.cpu_count() or 1) > 1 else None)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    return parser.parse_args()


def paced_capacity(url: str, pid: int, jpegs: list[bytes], args: argparse.Namespace, timeout_s: float) -> dict:
    """Images answered per second (and per server CPU-second) by closed-loop clients at the service's own pace."""
    concurrency = args.concurrency or 2 * args.max_batch_size
    cpu = cpu_seconds(pid)
    paced = asyncio.run(closed_loop(url, jpegs, concurrency, args.capacity_seconds, timeout_s))
    cpu = cpu_seconds(pid) - cpu
    answered = sum(o.status == 200 for o in paced)
    summary = summarise(paced, args.capacity_seconds, args.deadline_s)
    return summary | {"img_per_s": answered / args.capacity_seconds, "img_per_server_cpu_s": answered / cpu}


def measure(url: str, pid: int, jpegs: list[bytes], args: argparse.Namespace) -> tuple[dict, list[Outcome]]:
    """Capacity, overload at args.overload x capacity, capacity again (the CPU is shared: neighbours come and go,
    so capacity is the mean of before and after), with the CPU seconds of the server and of this process."""
    timeout_s = args.deadline_s + 1.0  # callers give up a little after the service's own deadline
    before = paced_capacity(url, pid, jpegs, args, timeout_s)
    rate = args.overload * before["img_per_s"]
    print(f"capacity {before['img_per_s']:.2f} img/s; overload: {rate:.1f} req/s for {args.seconds:g} s")
    counts_before = service_counts(url)
    start_cpu, usage = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    end: dict[str, float] = {}  # the server's CPU over the phase's window, the window goodput is counted in

    def at_end() -> None:
        end["server_cpu"] = cpu_seconds(pid)

    outcomes = asyncio.run(open_loop(url, jpegs, rate, args.seconds, timeout_s, at_end))
    used = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = end["server_cpu"] - start_cpu
    counts = {k: v - counts_before.get(k, 0.0) for k, v in service_counts(url).items()}
    after = paced_capacity(url, pid, jpegs, args, timeout_s)
    print(f"capacity after: {after['img_per_s']:.2f} img/s")
    client_cpu = (used.ru_utime - usage.ru_utime) + (used.ru_stime - usage.ru_stime)
    overload = summarise(outcomes, args.seconds, args.deadline_s)
    capacity = (before["img_per_s"] + after["img_per_s"]) / 2
    per_cpu = (before["img_per_server_cpu_s"] + after["img_per_server_cpu_s"]) / 2
    good = overload["goodput_per_s"] * args.seconds
    return {
        "capacity_img_per_s": capacity,
        "capacity_before": before,
        "capacity_after": after,
        "overload": overload,
        "goodput_ratio": overload["goodput_per_s"] / capacity,
        # contention-proof: images within the deadline per CPU-second the server got, against the same at its pace
        "goodput_ratio_per_server_cpu_s": good / server_cpu / per_cpu,
        "service_counts": counts,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "client_cpu_share": client_cpu / args.seconds,
    }, outcomes


def main() -> int:
    args = parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))
    args.out.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_artifact(args.variant, Path(tmp) / f"{args.variant}.safetensors", "random")
        server, url = start_server(artifact, args)
        try:
            print(f"capacity: closed-loop clients for {args.capacity_seconds:g} s, before and after the overload")
            measured, outcomes = measure(url, server.pid, jpegs, args)
        finally:
            server.terminate()
            server.wait(60)
    results = {
        "variant": args.variant,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "deadline_s": args.deadline_s,
        "overload_factor": args.overload,
        "seconds": args.seconds,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        **measured,
        "outcomes": [asdict(o) for o in outcomes],
    }
    report(results)
    (args.out / "overload.json").write_text(json.dumps(results, indent=1))
    plot(results, outcomes, args.out / "overload.png")
    print(f"wrote {args.out / 'overload.png'} and {args.out / 'overload.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
