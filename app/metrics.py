"""The service's Prometheus metrics (petvit_*), in one registry per app (tests build many apps in one process), and
the reasons petvit_rejected_total counts refused requests by."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.process_collector import ProcessCollector

from app.errors import ErrorCode, ServiceError
from model.batch_sizes import pow2_batch_sizes

if TYPE_CHECKING:  # torch is imported where a GPU gauge is refreshed, not when metrics load
    import torch

# The *_created series double the exposition for no dashboard we draw; Prometheus itself ignores them.
disable_created_metrics()

# Latency buckets from 1 ms to 30 s: a tiny model answers in milliseconds, a big one on a busy CPU in seconds.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# petvit_rejected_total{reason}: one count per refused request, by its error code's reason (app/errors.ErrorCode).
# Dashboards and alerts match these values (tests/deploy checks them). The API-key check in app/deps.py counts
# "unauthorized" itself: it refuses before the route runs.
REJECTION_REASONS = frozenset(code.reason for code in ErrorCode if code.reason is not None)


# petvit_reloads_total{outcome}: POST /v1/admin/reload and SIGHUP. "refused": the new artifact is not one we can
# serve (missing, a pickle, truncated, wrong shapes); "forbidden": its path lies outside the model folders (someone
# with the admin key tried to reach another file); "no_memory": it would not fit beside the live model on the GPU;
# "busy": another reload was running; "failed": anything else (the log says what). A refusal's outcome is its error
# code's (ErrorCode.reload_outcome); this is the order they are exported in.
RELOAD_OUTCOMES = ("success", "refused", "forbidden", "no_memory", "busy", "failed")


# petvit_compile_checks_total{outcome}: the compiled model built behind the eager one at start (PETVIT_COMPILE, int8).
# "agreed": its forward matched eager float32 on the probe batch and it took over; "disagreed": it did not (a stale
# or wrong kernel: eager keeps serving); "failed": compiling or warming it raised (eager keeps serving).
COMPILE_OUTCOMES = ("agreed", "disagreed", "failed")
# petvit_int8_checks_total{outcome}: with PETVIT_DTYPE=int8, the eager int8 model checked against eager float32 on
# the probe batch before it serves (at start and on every reload). "agreed": int8 serves; "disagreed": its kernels
# are not faithful on this machine, float32 serves instead (WARNING in the log) and nothing is compiled behind it.
INT8_OUTCOMES = ("agreed", "disagreed")


class Metrics:
    def __init__(self, max_batch_size: int = 16, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(namespace="petvit", registry=r)
        self.requests = Counter("petvit_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "petvit_request_duration_seconds", "HTTP request latency", ["route"], buckets=_SECONDS, registry=r
        )
        self.images = Counter("petvit_images", "images classified", registry=r)
        self.unknown = Counter("petvit_unknown", "images classified as none of the model's classes", registry=r)
        self.preprocess_duration = Histogram(
            "petvit_preprocess_duration_seconds", "decode + resize + crop per image", buckets=_SECONDS, registry=r
        )
        self.queue_wait = Histogram(
            "petvit_queue_wait_seconds", "time an image waited for its batch", buckets=_SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "petvit_batch_size",
            "images per forward pass",
            buckets=[float(b) for b in pow2_batch_sizes(max_batch_size)],
            registry=r,
        )
        self.batch_flush = Counter("petvit_batch_flush", "batches released, by reason", ["reason"], registry=r)
        for reason in ("full", "timeout", "shutdown"):
            self.batch_flush.labels(reason)  # export zeros so rate() works before the first flush
        self.inference_duration = Histogram(
            "petvit_inference_duration_seconds", "model time per batch", buckets=_SECONDS, registry=r
        )
        self.queue_depth = Gauge("petvit_queue_depth", "images waiting for the model", registry=r)
        self.rejected = Counter("petvit_rejected", "requests or images refused, by reason", ["reason"], registry=r)
        self.model_info = Gauge(
            "petvit_model_info", "the loaded model (value 1)", ["name", "arch", "sha256", "dtype"], registry=r
        )
        # Queued images that never reached the model: "cancelled" (the client disconnected), "abandoned" (its request
        # already failed: the deadline, a failed sibling), "expired" (its deadline passed, or would before the batch
        # is done). The requests are counted once more in rejected_total.
        self.dropped_images = Counter(
            "petvit_dropped_images", "queued images dropped before the model ran them", ["reason"], registry=r
        )
        for reason in ("cancelled", "abandoned", "expired"):
            self.dropped_images.labels(reason)
        self.reloads = Counter("petvit_reloads", "model reloads, by outcome", ["outcome"], registry=r)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.compiled_serving = Gauge(
            "petvit_compiled_serving", "1 while the compiled forward serves, 0 while the eager one does", registry=r
        )
        self.compile_checks = Counter(
            "petvit_compile_checks",
            "compiled models checked against eager float32, by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in COMPILE_OUTCOMES:
            self.compile_checks.labels(outcome)
        self.int8_checks = Counter(
            "petvit_int8_checks", "eager int8 models checked against float32 before serving", ["outcome"], registry=r
        )
        for outcome in INT8_OUTCOMES:
            self.int8_checks.labels(outcome)
        self.gpu_allocated: Gauge | None = None  # created by enable_gpu_gauges, only when serving on CUDA
        self.gpu_decode: Counter | None = None  # created by enable_gpu_decode_counter, only with PETVIT_GPU_DECODE on

    def count_rejection(self, error: ServiceError) -> None:
        """Count a refused request once, by its reason; the service's own failures are not refusals."""
        if error.kind.reason is not None:
            self.rejected.labels(error.kind.reason).inc()

    def enable_gpu_decode_counter(self) -> None:
        """petvit_gpu_decode_images_total{path}: deferred JPEGs decoded on the model's device ("device") or, refused
        there, on the CPU ("cpu_fallback"). A rising fallback share means the GPU input path is not doing its job."""
        self.gpu_decode = Counter(
            "petvit_gpu_decode_images", "deferred JPEGs by where they were decoded", ["path"], registry=self.registry
        )
        for path in ("device", "cpu_fallback"):
            self.gpu_decode.labels(path)  # export zeros so rate() works before the first image

    def enable_gpu_gauges(self) -> None:
        r = self.registry
        self.gpu_allocated = Gauge("petvit_gpu_memory_allocated_bytes", "CUDA memory held by tensors", registry=r)
        self.gpu_reserved = Gauge("petvit_gpu_memory_reserved_bytes", "CUDA memory held by the allocator", registry=r)
        self.gpu_max_allocated = Gauge(
            "petvit_gpu_memory_max_allocated_bytes", "peak CUDA memory held by tensors", registry=r
        )

    def update_gpu_memory(self, device: torch.device) -> None:
        """Refresh the GPU gauges at scrape time (cheap: allocator counters, no sync)."""
        if self.gpu_allocated is None or getattr(device, "type", None) != "cuda":
            return
        import torch

        self.gpu_allocated.set(torch.cuda.memory_allocated(device))
        self.gpu_reserved.set(torch.cuda.memory_reserved(device))
        self.gpu_max_allocated.set(torch.cuda.max_memory_allocated(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
