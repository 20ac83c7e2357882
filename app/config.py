"""Service settings, read from PETVIT_* environment variables (pydantic-settings).

Every limit has a default that is safe on a small CPU box; docs/service.md lists them all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.precision import canonical_dtype


class Settings(BaseSettings):
    # env_ignore_empty: compose passes `PETVIT_DTYPE:` through as "" when unset on the host; that means "default".
    model_config = SettingsConfigDict(env_prefix="PETVIT_", env_file=None, extra="ignore", env_ignore_empty=True)

    checkpoint: Path = Field(Path("artifacts/petvit.safetensors"), description="model artifact (.safetensors)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto tries cuda, then mps, then cpu")
    # "auto" is model.precision's rule (bfloat16 on CUDA and on CPUs where it measures faster, float32 elsewhere),
    # the one training and the benches use; the short forms fp32/bf16/fp16 are accepted and stored as torch's names.
    # "int8" (opt-in, never chosen by auto) quantises a float32 artifact's Linear layers at load time through torchao
    # (the [int8] extra) and always compiles the forward: model/inference.py.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # torch.compile the forward. The service turns ready with the eager model at once and compiles each bucket of
    # batch sizes (pow2_batch_sizes) behind it, swapping the compiled model in once it agrees with eager float32
    # (app/lifecycle.py). Off by default: on CPU it costs minutes of a core with a cold cache and no float32 speed,
    # while the padding to buckets costs work (docs/service.md has the measurements).
    compile: bool = Field(False, description="torch.compile the forward (int8 always compiles)")
    # Where compiled kernels are kept across restarts (a compose volume, a Kubernetes volume): the service opens only
    # the sub-folder named by this process's kernel facts (model/compile_cache.py), since inductor's own cache does not
    # tell CPU kernel settings apart. Unset: inductor's default, a temporary folder lost with the container.
    compile_cache_dir: Path | None = Field(None, description="kept compile cache (keyed by CPU/GPU, torch, ISA)")
    max_batch_size: int = Field(16, ge=1, le=1024, description="images per forward pass at most")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits for company")
    queue_limit: int = Field(256, ge=1, description="images waiting for the model before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline; 504 past it")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="bytes per image")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height per image, read from the header")
    max_files: int = Field(16, ge=1, description="images per request")
    default_top_k: int = Field(5, ge=1)
    # "auto": every batch size on accelerators (cheap there, and kernels are chosen per shape); on CPU powers of
    # two plus max_batch_size, because warming 1..N costs N(N+1)/2 images and CPU kernels barely care about B.
    warmup: Literal["auto", "all", "pow2", "none"] = "auto"
    # 0 keeps PyTorch's default (one intra-op thread per core). On a CPU shared with other busy processes, set it
    # lower: OpenMP threads spin at every barrier waiting for a descheduled peer (DEVELOPERS.md: 10-30x slower on a
    # busy 2-core machine).
    torch_threads: int = Field(0, ge=0, description="PyTorch intra-op threads; 0 = one per core")
    preprocess_threads: int = Field(2, ge=1, description="threads decoding and resizing uploads")
    # Where JPEG uploads are decoded (app/gpu_decode.py): "auto" = on the GPU (nvJPEG, in batches, on the inference
    # thread) when the model is on CUDA and torchvision's GPU decoder works there; "on" forces it (an error on a GPU
    # without it; on a CPU it runs torchvision's CPU decoder, which tests use); "off" = the CPU pool, always.
    gpu_decode: Literal["auto", "on", "off"] = "auto"
    # Open set (docs/trust.md): an image whose open-set score is above this is `unknown` ("no pet recognised").
    # Unset: the threshold the artifact stores (chosen on its validation split); on the artifact's own score's scale.
    unknown_threshold: float | None = Field(None, description="override the artifact's open-set threshold")
    api_key: SecretStr | None = Field(None, description="when set, /classify needs header X-API-Key")
    # POST /v1/admin/reload exists only when this is set, and needs it in header X-Admin-Key. SIGHUP reloads either way.
    admin_key: SecretStr | None = Field(None, description="enables POST /v1/admin/reload (header X-Admin-Key)")
    # POST /v1/admin/reload loads only from PETVIT_CHECKPOINT's folder and these (app/reload.py: checked_checkpoint),
    # after symlinks and `..` are followed: the admin key changes the model, it does not read the server's files.
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="comma-separated folders reloads may load from, beside PETVIT_CHECKPOINT's"
    )
    # A reload on CUDA is refused unless free memory holds the new artifact's bytes times this (weights, warm-up
    # activations and allocator slack), since the old model stays loaded until the new one has taken over.
    reload_memory_factor: float = Field(1.5, ge=1.0, description="CUDA reloads: free memory needed / artifact bytes")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"  # names logging and uvicorn share

    @model_validator(mode="after")
    def _a_full_request_fits_the_queue(self) -> Settings:
        if self.queue_limit < self.max_files:  # such a request would get 429 "retry later" for ever
            raise ValueError(
                f"PETVIT_QUEUE_LIMIT ({self.queue_limit}) must be at least PETVIT_MAX_FILES ({self.max_files}): "
                "a request's images are queued together or not at all"
            )
        return self

    @field_validator("dtype", mode="before")
    @classmethod
    def _canonical_dtype(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            return canonical_dtype(value)
        except ValueError:
            return value  # the Literal check then names the accepted values

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("cors_origins", "model_dirs", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


def describe_invalid_settings(error: ValidationError) -> str:
    """One line per refused setting, named as the environment variable people set, not as the Python field:
    `PETVIT_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1`."""
    lines = []
    for problem in error.errors():
        if problem.get("loc"):
            lines.append(f"PETVIT_{str(problem['loc'][0]).upper()}={problem.get('input')!r}: {problem['msg']}")
        else:  # a rule over several settings: its message names them
            lines.append(problem["msg"])
    return "\n".join(lines)


def settings_or_report(command: str) -> Settings | None:
    """Settings from the environment, or None after printing to stderr which variables are wrong and why, for a
    command line to exit 2 on instead of a traceback."""
    try:
        return Settings()
    except ValidationError as err:
        print(f"{command}: invalid settings:\n{describe_invalid_settings(err)}", file=sys.stderr)
        return None
