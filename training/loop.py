"""The training loop for the recipes (training/recipes.py), with resume, best-epoch
selection on held-out data, per-epoch JSON log, tqdm bars, DDP under torchrun and an exported artifact.

train() reads as prepare -> epochs -> finish. What differs between recipes (a head over cached features, or the
whole network under DDP) is the recipe's plan (training/plans.py); one epoch's steps are in training/epoch.py.

    petvit train --recipe linear-probe --dataset pets --data-dir data --out artifacts/petvit.safetensors
    torchrun --nproc-per-node 8 -m cli train --recipe finetune --device cuda ...

Run directory (--output-dir, default <artifact folder>/runs/<artifact name>): last_state.safetensors (resumable
state), best_weights.safetensors (best epoch so far), log.json (every epoch), features/ (linear-probe cache),
and the test report + PNGs written at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm import tqdm

from model.convert.teachers import ConvNet
from model.device import resolve_device
from model.precision import TRAINING_DTYPE_CHOICES, autocast_dtype
from model.trust import Calibration
from model.vit import ViT
from training.calibration import calibration_report, too_few_for_a_temperature
from training.data import DataConfig, DatasetUnavailable, DataSplits, load_splits
from training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    local_main_first,
    shutdown_distributed,
)
from training.epoch import Optimization, Runtime, held_out_accuracy, train_one_epoch
from training.evaluate import compute_metrics, metadata_summary, write_report
from training.open_set import fit_trust
from training.plans import Plan, plan_for
from training.recipes import TrainConfig, build_model, parameter_groups
from training.train_state import (
    BEST_FILE,
    STATE_FILE,
    load_train_state,
    load_weights,
    read_train_state_info,
    save_train_state,
    save_weights,
)

LOG_FILE = "log.json"


@dataclass(frozen=True)
class RunConfig:
    """Where and how to run, as opposed to what to train (TrainConfig) and on what (DataConfig). A field with
    "help" metadata is a `petvit train` flag (cli/flags.py builds it)."""

    out: str = field(default="artifacts/petvit.safetensors", metadata={"help": "artifact to write"})
    output_dir: str = field(
        default="artifacts/runs/petvit",
        metadata={
            "help": "run directory (default: <artifact folder>/runs/<artifact name>)",
            "default": None,  # the command derives it from --out
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto: CUDA when present, else MPS, else the CPU", "choices": ("auto", "cpu", "cuda", "mps")},
    )
    # autocast dtype by model.precision's rule: auto = bfloat16 on CUDA, float32 elsewhere
    dtype: str = field(
        default="auto", metadata={"help": "autocast dtype; auto: bfloat16 on CUDA", "choices": TRAINING_DTYPE_CHOICES}
    )
    # None = a sensible number for this machine (default_workers)
    workers: int | None = field(default=None, metadata={"help": "DataLoader worker processes"})
    resume: bool = field(default=False, metadata={"help": "continue from the run directory's last state"})
    # pre-emptible jobs run a few epochs per invocation and continue with --resume
    stop_after: int | None = field(
        default=None, metadata={"help": "run at most N epochs now; continue later with --resume"}
    )
    # evaluate the best epoch on the test split and store the summary in the artifact
    evaluate: bool = field(
        default=True, metadata={"help": "skip the final test-split evaluation", "flag": "--no-evaluate"}
    )
    # on a shared box fewer threads avoid oversubscription stalls
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})


# ---------------------------------------------------------------------------------------------- environment
def pick_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    """The training device; under DDP each rank takes the GPU of its local rank."""
    return resolve_device(name, index=dist_info.local_rank if dist_info else 0)


def default_recipe(device: torch.device) -> str:
    """--recipe auto: fine-tune the whole ViT on a GPU; on a CPU only a linear probe finishes in useful time."""
    return "finetune" if device.type == "cuda" else "linear-probe"


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    # On a GPU, JPEG decoding is the bottleneck: use the cores. On a small CPU box the model needs them.
    return min(8, cpus - 1) if device.type == "cuda" else (0 if cpus <= 2 else min(4, cpus // 2))


def git_commit(repo: Path | None = None) -> str:
    """The petvit checkout's commit, "-dirty" when tracked files differ from it; "unknown" outside a checkout.

    Only the repository this file belongs to counts: an installed copy (site-packages) that happens to sit inside
    some other git repository must not record that repository's commit.
    """
    repo = repo or Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return "unknown"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else commit or "unknown"


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed per epoch: shuffling, augmentation, mixing and dropout depend only on (seed, epoch, rank), so a run
    resumed at epoch e draws exactly what an uninterrupted run would have. Each DDP rank gets its own stream:
    with one shared seed every rank would draw the same crops, mixing factors, dropout masks and DataLoader
    worker seeds for its different images. Rank 0 draws what a single-process run draws."""
    base = seed * 100_003 + epoch
    torch.manual_seed(base + rank * 1_000_000_007)
    return torch.Generator().manual_seed(base)


# ---------------------------------------------------------------------------------------------- bookkeeping
class RunLog:
    """log.json in the run dir, rewritten after every epoch (rank 0 only); history survives --resume."""

    def __init__(self, path: Path, header: dict[str, Any], history: list[dict[str, Any]], enabled: bool) -> None:
        self.path, self.header, self.history, self.enabled = path, header, history, enabled

    def append(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.header, "epochs": self.history}, indent=2))
        tmp.replace(self.path)


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    best = " *" if rec.get("is_best") else ""
    return (
        f"epoch {rec['epoch']:>3}/{epochs}  train loss {rec['train_loss']:.4f}  train top-1 {rec['train_top1']:.3f}  "
        f"held-out loss {rec['val_loss']:.4f}  held-out top-1 {rec['val_top1']:.3f}  lr {rec['lr']:.2e}  "
        f"{rec['images_per_s']:.0f} img/s  {rec['seconds']:.1f}s{best}"
    )


def check_resumable(
    state_path: Path, info: dict[str, Any], cfg: TrainConfig, fingerprint: dict[str, Any] | None = None
) -> None:
    """Refuse to continue a run with settings that change what is trained (ValueError saying what differs).

    info: the saved state's JSON info; fingerprint: what the recipe's plan also requires (Plan.fingerprint: the
    teacher's sha256 and the loss settings of a distillation), compared with the one saved beside it.
    """
    saved, saved_plan = info.get("train") or {}, info.get("plan") or {}
    keys = ("recipe", "variant", "model_overrides", "seed")
    differ = [f"{k} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
    current = fingerprint or {}
    for key in sorted(set(current) | set(saved_plan)):
        if saved_plan.get(key) != current.get(key):
            differ.append(f"{key} {saved_plan.get(key)!r} (now {current.get(key)!r})")
    if differ:
        raise ValueError(
            f"{state_path} was saved by a run with {', '.join(differ)}; resume it with the same "
            "--recipe/--variant/--set/--seed (and --teacher/--distill*/--arch/--init) or choose another --output-dir"
        )


def require_examples(splits: DataSplits, data: DataConfig) -> None:
    """An empty train or validation split would train on nothing or pick the "best" epoch from no data."""
    for name, hint in (("train", "add images"), ("val", "raise --val-fraction or add images per class")):
        if len(getattr(splits, name)) == 0:
            raise DatasetUnavailable(
                f"the {name} split of {data.data_dir} is empty ({splits.sizes}); {hint} "
                "(each class needs at least two images to have one held out for validation)"
            )


# ---------------------------------------------------------------------------------------------- the run
class BestEpoch(TypedDict):
    """The best epoch so far: what best_weights.safetensors holds, kept in the resumable state and the summary."""

    epoch: int | None  # 1-based; None before the first epoch
    val_top1: float  # its held-out top-1 (-1.0 before the first epoch, so any epoch beats it)


@dataclass
class TrainJob:
    """One run as prepare() leaves it: the epochs advance `best` and the log, finish() exports from both."""

    cfg: TrainConfig
    data: DataConfig  # with the model's image size
    run: RunConfig
    env: Runtime
    splits: DataSplits
    model: ViT | ConvNet  # ConvNet: a convnet teacher (recipe teacher)
    plan: Plan  # what the recipe trains of `model`, on which batches
    opt: Optimization
    log: RunLog  # every epoch so far, those of earlier invocations of a resumed run included
    start_epoch: int  # the first epoch this invocation trains, 0-based
    best: BestEpoch

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)


def train(cfg: TrainConfig, data: DataConfig, run: RunConfig) -> dict[str, Any]:
    """Train per the recipe; write the run dir and the artifact; return a summary (rank 0's view)."""
    started = time.time()
    if run.threads:
        torch.set_num_threads(run.threads)
    info = init_distributed(pick_device(run.device).type)
    try:
        return _train(cfg, data, run, info, started)
    finally:
        shutdown_distributed(info)


def _train(cfg: TrainConfig, data: DataConfig, run: RunConfig, info: DistInfo, started: float) -> dict[str, Any]:
    """prepare -> epochs -> finish, on every rank."""
    job = prepare(cfg, data, run, info)
    run_epochs(job)
    barrier(info)  # the ranks leave the epochs together; a probe's other ranks wait here for rank 0
    return finish(job, started)


# ---------------------------------------------------------------------------------------------- prepare
def prepare(cfg: TrainConfig, data: DataConfig, run: RunConfig, info: DistInfo) -> TrainJob:
    """Everything before the first epoch: data, model, the recipe's plan, optimizer, resume point, log, batches."""
    device = pick_device(run.device, info)
    workers = default_workers(device) if run.workers is None else run.workers
    env = Runtime(device, autocast_dtype(run.dtype, device), workers, info)
    with local_main_first(info):  # one download per node (data, ImageNet weights), the other ranks read it
        splits = load_splits(data)
        require_examples(splits, data)
        model = build_model(cfg, len(splits.labels)).to(device)
    plan = plan_for(model, cfg, env)  # what trains: the whole network, or (linear probe) only its head
    data = replace(data, image_size=plan.image_size)
    optimizer = torch.optim.AdamW(parameter_groups(plan.trained, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    start_epoch, best, history = resume_point(cfg, run, plan, optimizer, env)
    log = RunLog(Path(run.output_dir) / LOG_FILE, run_header(cfg, data, run, env, splits), history, info.is_main)
    # Batches last: a --resume that does not fit is refused before a probe spends minutes extracting features.
    plan.prepare(splits, data, Path(run.output_dir), with_test=run.evaluate)
    opt = Optimization.for_recipe(optimizer, cfg, plan.steps_per_epoch, plan.mixer, plan.distillation)
    return TrainJob(cfg, data, run, env, splits, model, plan, opt, log, start_epoch, best)


def resume_point(
    cfg: TrainConfig, run: RunConfig, plan: Plan, optimizer: torch.optim.Optimizer, env: Runtime
) -> tuple[int, BestEpoch, list[dict[str, Any]]]:
    """(first epoch to train, best epoch so far, history so far). With --resume and a state in the run directory,
    the plan's `trained` part and the optimizer are restored from it; otherwise the run starts fresh."""
    state_path = Path(run.output_dir) / STATE_FILE
    if not (run.resume and state_path.exists()):
        if run.resume and env.show:
            print(f"--resume: no state in {run.output_dir}, starting from scratch")
        return 0, BestEpoch(epoch=None, val_top1=-1.0), []
    # Check before loading: a state of another recipe or model would otherwise die in load_state_dict.
    check_resumable(state_path, read_train_state_info(state_path), cfg, plan.fingerprint())
    try:
        saved = load_train_state(state_path, plan.trained, optimizer, env.device)
    except ValueError as err:  # e.g. another dataset: the head has another number of classes
        raise ValueError(f"{err}; resume with the same settings or choose another --output-dir") from None
    if env.show:
        print(f"resuming {state_path} at epoch {saved['next_epoch'] + 1}/{cfg.epochs}")
    return saved["next_epoch"], saved["best"], saved["history"]


def run_header(cfg: TrainConfig, data: DataConfig, run: RunConfig, env: Runtime, splits: DataSplits) -> dict[str, Any]:
    """log.json's fields besides the epochs: the settings and where the run ran."""
    return {
        "train": cfg.to_dict(),
        "data": data.to_dict(),
        "run": asdict(run),
        "world_size": env.info.world_size,
        "distributed": env.info.enabled,
        "device": str(env.device),
        "sizes": splits.sizes,
    }


# ---------------------------------------------------------------------------------------------- epochs
def run_epochs(job: TrainJob) -> None:
    """Train from the resume point to cfg.epochs, or --stop-after epochs of it now; log and save every epoch."""
    env = job.plan.epoch_runtime()
    if env is None:  # this rank trains nothing (a linear probe's ranks other than 0)
        return
    cfg, plan = job.cfg, job.plan
    step = job.start_epoch * plan.steps_per_epoch
    stop_at = cfg.epochs if job.run.stop_after is None else min(cfg.epochs, job.start_epoch + job.run.stop_after)
    for epoch in range(job.start_epoch, stop_at):
        tick = time.time()
        # Reseeded from (seed, epoch, rank): a resumed run draws exactly what an uninterrupted one would have.
        batches = plan.epoch_batches(epoch, seed_epoch(cfg.seed, epoch, job.env.info.rank))
        desc = f"epoch {epoch + 1}/{cfg.epochs}" if env.show else None
        step, stats = train_one_epoch(plan.step_module, batches, job.opt, step, env, desc)
        # Train statistics over every rank's shard (DDP), like the held-out ones.
        sums = torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64)
        loss_sum, correct, seen = all_reduce_sum(sums, env.info).tolist()
        val_loss, val_top1 = held_out_accuracy(plan.trained, plan.val_batches, env)
        seconds = time.time() - tick
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": correct / max(seen, 1),
            "lr": stats["lr"],
            "val_loss": val_loss,
            "val_top1": val_top1,
            "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9),
            "is_best": val_top1 > job.best["val_top1"],
        }
        record_epoch(job, record)


def record_epoch(job: TrainJob, record: dict[str, Any]) -> None:
    """Log the epoch; rank 0 prints it and saves the resumable state, and the weights when it is the best yet."""
    is_main = job.env.info.is_main
    if record["is_best"]:
        job.best = BestEpoch(epoch=record["epoch"], val_top1=record["val_top1"])
        if is_main:
            save_weights(job.run_dir / BEST_FILE, job.plan.trained)  # a probe's head alone: no 350 MB rewrites
    job.log.append(record)
    if is_main:
        tqdm.write(epoch_line(record, job.cfg.epochs))
        progress = {"next_epoch": record["epoch"], "best": job.best, "history": job.log.history}
        info = {**progress, "train": job.cfg.to_dict(), "plan": job.plan.fingerprint()}
        save_train_state(job.run_dir / STATE_FILE, job.plan.trained, job.opt.optimizer, info)


# ---------------------------------------------------------------------------------------------- finish
def finish(job: TrainJob, started: float) -> dict[str, Any]:
    """Rank 0 of a run that reached its last epoch exports the best epoch's model (scored on the test split
    unless --no-evaluate); every rank returns the summary."""
    history = job.log.history
    finished = len(history) > 0 and history[-1]["epoch"] >= job.cfg.epochs
    summary: dict[str, Any] = {"finished": finished, "best": job.best, "run_dir": str(job.run_dir), "history": history}
    if not finished and job.env.show:
        print(f"stopped after epoch {history[-1]['epoch'] if history else 0}; continue with --resume")
    if not finished or not job.env.info.is_main:
        return summary

    # The exported model is the best epoch's weights, not the last epoch's.
    load_weights(job.run_dir / BEST_FILE, job.plan.trained)
    job.model.eval()
    fields = artifact_fields(job, started) | trust_fields(job)
    if job.run.evaluate:
        history = fields["training"]["history"]
        fields["evaluation"] = evaluate_test(job, fields["name"], history, fields.get("calibration"))
        summary["test"] = fields["evaluation"]
    path = job.plan.write_artifact(job.run.out, fields)
    print(f"wrote {path} (best epoch {job.best['epoch']}, held-out top-1 {job.best['val_top1']:.4f})")
    summary["artifact"] = str(path)
    return summary


def artifact_fields(job: TrainJob, started: float) -> dict[str, Any]:
    """The artifact's metadata fields: the labels the service shows and how the weights were trained (the plan
    adds its own records, e.g. a distillation's teacher)."""
    cfg, data, splits = job.cfg, job.data, job.splits
    return {
        "name": f"petvit-{job.plan.model_name}-{cfg.recipe}-{data.dataset}",
        "variant": job.plan.model_name,
        "trained": True,
        "labels": splits.labels,
        "species": splits.species,
        "training": {
            "recipe": cfg.recipe,
            "dataset": data.dataset,
            "data_dir": str(data.data_dir),
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "commit": git_commit(),
            "best_epoch": job.best["epoch"],
            "best_val_top1": job.best["val_top1"],
            "config": cfg.to_dict(),
            "data": data.to_dict(),
            "sizes": splits.sizes,
            "world_size": job.env.info.world_size,
            "device": str(job.env.device),
            "duration_s": round(time.time() - started, 1),
            "history": [{k: v for k, v in r.items() if k != "is_best"} for r in job.log.history],
            **job.plan.training_record(),
        },
        "provenance": {"source": f"petvit train --recipe {cfg.recipe}", "run_dir": str(job.run_dir)},
    }


def trust_fields(job: TrainJob) -> dict[str, Any]:
    """The temperature (fitted on the validation split) and the open set (class Gaussians on the train split,
    thresholds on the validation split) of the exported model; nothing for a network the service does not serve."""
    outputs = job.plan.trust_outputs(job.splits)
    if outputs is None:
        return {}
    fields = fit_trust(*outputs, num_classes=len(job.splits.labels))
    cal, open_set = fields["calibration"], fields["open_set"]
    if refused := too_few_for_a_temperature(cal.num_images or 0, cal.split):  # said, not silently kept at 1
        print(f"WARNING {refused}")
    print(
        f"calibration on val: temperature {cal.temperature:.3f}, ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}; "
        f"open set: {open_set.score} threshold {open_set.threshold:.4g} accepts "
        f"{open_set.target_acceptance:.0%} of val"
    )
    return fields


def evaluate_test(
    job: TrainJob, name: str, history: list[dict[str, Any]], calibration: Calibration | None = None
) -> dict[str, Any]:
    """Score the model on the test split: report.json and the PNGs in the run dir, a printed line, and the
    summary the artifact stores."""
    data, labels = job.data, job.splits.labels
    logits, targets = job.plan.test_logits(job.splits)
    report = {
        "name": name,
        "dataset": data.dataset,
        "data_dir": str(data.data_dir),
        "split": "test",
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "labels": labels,
        **compute_metrics(logits, targets, labels, job.splits.species),
        "calibration": calibration_report(logits, targets, calibration, job.run_dir, f"{name} on test"),
    }
    write_report(report, labels, job.run_dir, history)
    cvd = report["cat_vs_dog"]
    print(
        f"test ({report['num_images']} images): top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}"
        + (f"  cat-vs-dog {cvd:.4f}" if cvd is not None else "")
    )
    return metadata_summary(report)
