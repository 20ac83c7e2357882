"""`petvit predict IMAGE...`: classify local files with a local model, no server.

The model library alone (model.inference's Classifier, model.preprocess, model.overlay) answers, exactly as the
service would; of the service package only its settings are read (PETVIT_CHECKPOINT, PETVIT_DEVICE, ...: the same
Settings, checked the same way, as `petvit serve`), and only once the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.explain import DEFAULT_METHOD, SERVICE_METHODS
from model.precision import INFERENCE_DTYPE_CHOICES

if TYPE_CHECKING:
    from model.inference import Classifier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5, help="breeds per image (default 5)")
    parser.add_argument(
        "--heatmap",
        type=Path,
        metavar="OUT.png",
        help="write the photo with the heatmap over it here (OUT-<n>.png when several)",
    )
    parser.add_argument(
        "--heatmap-method",
        choices=sorted(SERVICE_METHODS),
        default=DEFAULT_METHOD,
        help=f"which heatmap, as POST /classify's heatmap_method (default {DEFAULT_METHOD})",
    )
    parser.add_argument("--checkpoint", type=Path, help="artifact (default PETVIT_CHECKPOINT)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default PETVIT_DEVICE)")
    parser.add_argument(
        "--dtype", choices=INFERENCE_DTYPE_CHOICES, help="compute dtype, or int8 (default PETVIT_DTYPE)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def heatmap_path(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}-{index + 1}{out.suffix or '.png'}")


def main(args: argparse.Namespace) -> int:
    from app.config import settings_or_report  # pydantic-settings only: the deployment's PETVIT_* configuration
    from model.artifact import ArtifactError
    from model.inference import Classifier, MissingExtraError

    settings = settings_or_report("petvit predict")
    if settings is None:
        return 2
    checkpoint = args.checkpoint or settings.checkpoint
    try:
        # Not compiled (PETVIT_COMPILE is the service's): one image at a time, compiling costs more than it saves.
        # int8 compiles anyway (model/inference.py), for its one batch size.
        classifier = Classifier.from_artifact(checkpoint, args.device or settings.device, args.dtype or settings.dtype)
    except (ArtifactError, MissingExtraError) as err:
        print(f"petvit predict: {err}")
        return 2
    if args.heatmap is not None and args.heatmap_method == "gradient" and classifier.dtype_name == "int8":
        # as POST /classify answers it (422): an int8 model's quantised layers give no gradients to roll out
        print("petvit predict: --heatmap-method gradient needs gradients, which an int8 model does not have; "
              "use --heatmap-method rollout, or --dtype float32 / bfloat16")  # fmt: skip
        return 2
    status, answers = 0, []
    for index, path in enumerate(args.images):
        answer = _answer(classifier, args, settings.max_pixels, settings.unknown_threshold, index, path)
        if answer is None:
            status = 1
            continue
        answers.append(answer)
        if not args.json:
            _print(answer, classifier.unknown_threshold(settings.unknown_threshold))
    if args.json:
        print(json.dumps(answers, indent=2))
    if not classifier.metadata.trained:
        print(f"note: {classifier.metadata.name} is marked untrained; its predictions mean nothing yet")
    return status


def _answer(
    classifier: Classifier, args: argparse.Namespace, max_pixels: int, override: float | None, index: int, path: Path
) -> dict[str, Any] | None:
    """One file's answer, as POST /classify gives it (plus where its heatmap went); None after printing why not."""
    from model.overlay import compose, render_overlay
    from model.preprocess import ImageRejected, prepare

    want_map = args.heatmap is not None
    try:
        prepared = prepare(path.read_bytes(), classifier.preprocessing, max_pixels, keep_image=want_map)
    except (OSError, ImageRejected) as err:
        print(f"{path}: {err}")
        return None
    assert prepared.tensor is not None  # prepare() decodes on the CPU here: no JPEG is deferred to a device
    [result] = classifier.predict([prepared.tensor], [want_map], [args.heatmap_method])
    k = max(1, min(args.top_k, len(classifier.labels)))
    predictions = [{**p, "score": round(p["score"], 6)} for p in classifier.top_k(result.probs, k)]
    score = result.ood_score
    unknown = classifier.is_unknown(score, override)  # as POST /classify decides
    answer = {"image": str(path), "predictions": predictions, "unknown": unknown, "ood_score": score}
    if want_map and result.grid is not None and prepared.image is not None:
        out = heatmap_path(args.heatmap, index, len(args.images))
        out.parent.mkdir(parents=True, exist_ok=True)
        # The service sends the overlay alone; a person looking at a file wants it over the photo.
        compose(prepared.image, render_overlay(result.grid, prepared.size, prepared.crop_box)).save(out)
        answer["heatmap"] = str(out)
    return answer


def _print(answer: dict[str, Any], threshold: float | None) -> None:
    print(answer["image"])
    if answer["unknown"] and threshold is not None:
        score = answer["ood_score"]
        print(f"  no pet recognised (open-set score {score:.4g} > threshold {threshold:.4g}); best guesses:")
    for p in answer["predictions"]:
        print(f"  {p['score']:7.2%}  {p['label']} ({p['species']})")
    if "heatmap" in answer:
        print(f"  heatmap -> {answer['heatmap']}")
