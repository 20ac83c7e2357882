"""The training loop for the three recipes (training/recipes.py), with resume, best-epoch
selection on held-out data, per-epoch JSON log, tqdm bars, DDP under torchrun and an exported artifact.

    petvit train --recipe linear-probe --dataset pets --data-dir data --out artifacts/petvit.safetensors
    torchrun --nproc-per-node 8 -m cli train --recipe finetune --device cuda ...

Run directory (--output-dir, default <artifact folder>/runs/<artifact name>): last_state.safetensors (resumable
state), best_weights.safetensors (best epoch so far), log.json (every epoch), features/ (linear-probe cache),
and the test report + PNGs written at the end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from model.artifact import save_artifact
from model.device import resolve_device
from training.data import (
    DataConfig,
    DatasetUnavailable,
    DataSplits,
    batch_mixer,
    eval_transform,
    load_splits,
    train_transform,
)
from training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    local_main_first,
    shutdown_distributed,
)
from training.epoch import Optimization, Runtime, held_out_accuracy, train_one_epoch
from training.evaluate import compute_metrics, metadata_summary, predict, write_report
from training.features import cached_features
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
    """Where and how to run, as opposed to what to train (TrainConfig) and on what (DataConfig)."""

    out: str = "artifacts/petvit.safetensors"
    output_dir: str = "artifacts/runs/petvit"
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    workers: int | None = None  # DataLoader processes; None = a sensible number for this machine
    resume: bool = False
    stop_after: int | None = None  # epochs to run in this invocation (pre-emptible jobs continue with --resume)
    evaluate: bool = True  # evaluate the best epoch on the test split and store the summary in the artifact
    threads: int | None = None  # torch CPU threads; on a shared box fewer threads avoid oversubscription stalls


# ---------------------------------------------------------------------------------------------- environment
def pick_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    """The training device; under DDP each rank takes the GPU of its local rank."""
    return resolve_device(name, index=dist_info.local_rank if dist_info else 0)


def default_recipe(device: torch.device) -> str:
    """--recipe auto: fine-tune the whole ViT on a GPU; on a CPU only a linear probe finishes in useful time."""
    return "finetune" if device.type == "cuda" else "linear-probe"


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16}[dtype]


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


def check_resumable(state_path: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to continue a run with settings that change what is trained (ValueError saying what differs)."""
    keys = ("recipe", "variant", "model_overrides", "seed")
    differ = [f"{k} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(
            f"{state_path} was saved by a run with {', '.join(differ)}; resume it with the same "
            "--recipe/--variant/--set/--seed or choose another --output-dir"
        )


def require_examples(splits: DataSplits, data: DataConfig) -> None:
    """An empty train or validation split would train on nothing or pick the "best" epoch from no data."""
    for name, hint in (("train", "add images"), ("val", "raise --val-fraction or add images per class")):
        if len(getattr(splits, name)) == 0:
            raise DatasetUnavailable(
                f"the {name} split of {data.data_dir} is empty ({splits.extra.get('sizes')}); {hint} "
                "(each class needs at least two images to have one held out for validation)"
            )


# ---------------------------------------------------------------------------------------------- cached features
class FeatureBatches:
    """Shuffled mini-batches over cached (features, targets) tensors, reshuffled from the per-epoch generator."""

    def __init__(self, feats: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool) -> None:
        self.feats, self.targets, self.batch_size, self.shuffle = feats, targets, batch_size, shuffle
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.targets)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.feats[idx], self.targets[idx]


# ---------------------------------------------------------------------------------------------- the run
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
    device = pick_device(run.device, info)
    amp = autocast_dtype(run.dtype, device)
    workers = default_workers(device) if run.workers is None else run.workers
    run_dir = Path(run.output_dir)
    show = info.is_main

    with local_main_first(info):  # one download per node (data, ImageNet weights), the other ranks read it
        splits = load_splits(data)
        require_examples(splits, data)
        num_classes = len(splits.labels)
        model = build_model(cfg, num_classes).to(device)
    image_size = model.config.image_size
    data = replace(data, image_size=image_size)
    eval_tf = eval_transform(image_size)

    # What trains: the whole ViT, or (linear probe) only its head on cached features.
    probe = cfg.recipe == "linear-probe"
    if probe:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        trained: nn.Module = model.head
    else:
        trained = model
    optimizer = torch.optim.AdamW(parameter_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))

    header = {
        "train": cfg.to_dict(),
        "data": data.to_dict(),
        "run": asdict(run),
        "world_size": info.world_size,
        "distributed": info.enabled,
        "device": str(device),
        "sizes": splits.extra.get("sizes"),
    }
    start_epoch, best, history = 0, {"epoch": None, "val_top1": -1.0}, []
    state_path = run_dir / STATE_FILE
    if run.resume and state_path.exists():
        # Check before loading: a state of another recipe or model would otherwise die in load_state_dict.
        check_resumable(state_path, read_train_state_info(state_path)["train"], cfg)
        try:
            saved = load_train_state(state_path, trained, optimizer, device)
        except ValueError as err:  # e.g. another dataset: the head has another number of classes
            raise ValueError(f"{err}; resume with the same settings or choose another --output-dir") from None
        start_epoch, best, history = saved["next_epoch"], saved["best"], saved["history"]
        if show:
            print(f"resuming {state_path} at epoch {start_epoch + 1}/{cfg.epochs}")
    elif run.resume and show:
        print(f"--resume: no state in {run_dir}, starting from scratch")
    log = RunLog(run_dir / LOG_FILE, header, history, info.is_main)

    test_feats = None
    if probe:
        # Features once, on the deterministic eval view; every epoch after this is a few matrix multiplies.
        if info.is_main:
            cache = {}
            for name in ("train", "val", "test") if run.evaluate else ("train", "val"):
                view = getattr(splits, name).with_transform(eval_tf)
                feats, targets, hit = cached_features(
                    run_dir / "features",
                    name,
                    model,
                    view,
                    {"image_size": image_size, "transform": "eval"},
                    batch_size=max(16, cfg.batch_size // 4),
                    device=device,
                    num_workers=workers,
                    autocast_dtype=amp,
                )
                cache[name] = (feats.to(device), targets.to(device))
                print(f"{name} features {tuple(feats.shape)} ({'cache' if hit else 'extracted'})")
            test_feats = cache.get("test")
            train_batches = FeatureBatches(*cache["train"], cfg.batch_size, shuffle=True)
            val_batches = FeatureBatches(*cache["val"], 1024, shuffle=False)
    else:
        train_view = splits.train.with_transform(
            train_transform(image_size, cfg.augment, data.hflip, data.min_crop_scale)
        )
        if info.enabled:
            sampler: Any = DistributedSampler(train_view, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
            trained = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            sampler = RandomSampler(train_view)
        train_loader = DataLoader(
            train_view,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=len(train_view) > cfg.batch_size * info.world_size,  # steady batch statistics
            persistent_workers=False,
        )
        # Every world_size-th held-out item from rank on: the ranks split evaluation without padding.
        val_view = splits.val.with_transform(eval_tf)
        val_shard = Subset(val_view, range(info.rank, len(val_view), info.world_size))
        val_batches = DataLoader(val_shard, batch_size=cfg.batch_size)
    mixer = batch_mixer(num_classes) if cfg.mixup and not probe else None
    unwrapped = model.head if probe else model  # what the state and best-weights files hold
    # The probe's head is tiny: rank 0 trains it alone (no collectives), other ranks just wait for the artifact.
    epoch_env = Runtime(device, amp, workers, DistInfo() if probe else info)

    steps_per_epoch = len(train_batches) if probe and info.is_main else (0 if probe else len(train_loader))
    opt = Optimization.for_recipe(optimizer, cfg, steps_per_epoch, mixer)
    step = start_epoch * steps_per_epoch
    stop_at = cfg.epochs if run.stop_after is None else min(cfg.epochs, start_epoch + run.stop_after)

    for epoch in range(start_epoch, stop_at):
        if probe and not info.is_main:
            break
        tick = time.time()
        generator = seed_epoch(cfg.seed, epoch, info.rank)
        if probe:
            train_batches.generator = generator
            batches = train_batches
        else:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            else:
                sampler.generator = generator
            batches = train_loader
        desc = f"epoch {epoch + 1}/{cfg.epochs}" if show else None
        step, stats = train_one_epoch(trained, batches, opt, step, epoch_env, desc)
        # Train statistics over every rank's shard (DDP), like the held-out ones.
        sums = torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64)
        sums = all_reduce_sum(sums, epoch_env.info).tolist()
        val_loss, val_top1 = held_out_accuracy(unwrapped, val_batches, epoch_env)
        seconds = time.time() - tick
        record = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[2], 1),
            "train_top1": sums[1] / max(sums[2], 1),
            "lr": stats["lr"],
            "val_loss": val_loss,
            "val_top1": val_top1,
            "seconds": seconds,
            "images_per_s": sums[2] / max(seconds, 1e-9),
            "is_best": val_top1 > best["val_top1"],
        }
        if record["is_best"]:
            best = {"epoch": epoch + 1, "val_top1": val_top1}
            if info.is_main:
                save_weights(run_dir / BEST_FILE, unwrapped)  # the head alone for a probe: no 350 MB rewrites
        log.append(record)
        if info.is_main:
            tqdm.write(epoch_line(record, cfg.epochs))
            save_train_state(
                state_path,
                unwrapped,
                optimizer,
                {"next_epoch": epoch + 1, "best": best, "history": log.history, "train": cfg.to_dict()},
            )
    barrier(info)

    finished = len(log.history) > 0 and log.history[-1]["epoch"] >= cfg.epochs
    summary: dict[str, Any] = {"finished": finished, "best": best, "run_dir": str(run_dir), "history": log.history}
    if not info.is_main or not finished:
        if show and not finished:
            print(f"stopped after epoch {log.history[-1]['epoch'] if log.history else 0}; continue with --resume")
        return summary

    # The exported model is the best epoch's weights, not the last epoch's.
    load_weights(run_dir / BEST_FILE, unwrapped)
    best_model = model.eval()
    metadata: dict[str, Any] = {
        "name": f"petvit-{cfg.variant}-{cfg.recipe}-{data.dataset}",
        "variant": cfg.variant,
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
            "best_epoch": best["epoch"],
            "best_val_top1": best["val_top1"],
            "config": cfg.to_dict(),
            "data": data.to_dict(),
            "sizes": splits.extra.get("sizes"),
            "world_size": info.world_size,
            "device": str(device),
            "duration_s": round(time.time() - started, 1),
            "history": [{k: v for k, v in r.items() if k != "is_best"} for r in log.history],
        },
        "provenance": {"source": f"petvit train --recipe {cfg.recipe}", "run_dir": str(run_dir)},
    }
    if run.evaluate:
        if probe and test_feats is not None:
            with torch.no_grad():
                logits = best_model.head(test_feats[0]).float().cpu()
            targets = test_feats[1].cpu()
        else:
            test_view = splits.test.with_transform(eval_tf)
            logits, targets = predict(best_model, test_view, cfg.batch_size, device, workers, amp, desc="test")
        report = {
            "name": metadata["name"],
            "dataset": data.dataset,
            "data_dir": str(data.data_dir),
            "split": "test",
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "labels": splits.labels,
            **compute_metrics(logits, targets, splits.labels, splits.species),
        }
        write_report(report, splits.labels, run_dir, metadata["training"]["history"])
        metadata["evaluation"] = metadata_summary(report)
        summary["test"] = metadata["evaluation"]
        cvd = report["cat_vs_dog"]
        print(
            f"test ({report['num_images']} images): top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}"
            + (f"  cat-vs-dog {cvd:.4f}" if cvd is not None else "")
        )
    path = save_artifact(best_model.cpu(), run.out, metadata)
    print(f"wrote {path} (best epoch {best['epoch']}, held-out top-1 {best['val_top1']:.4f})")
    summary["artifact"] = str(path)
    return summary
