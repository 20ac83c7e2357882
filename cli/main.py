"""`petvit` command line: one subcommand per module, each exposing add_arguments(parser) and main(args) -> int.

Modules are imported only when their subcommand runs, so `petvit export` never imports FastAPI and
`petvit --help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cli.messages import is_not_writable, not_writable_line, use_host_terms

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("cli.export", "write an untrained (or ImageNet-initialised) model artifact"),
    "train": (
        "cli.train",
        "train on Oxford-IIIT Pet or an image folder (finetune, linear-probe, scratch, distill, teacher)",
    ),
    "import": ("cli.import_", "turn a published timm / Hugging Face ViT or DeiT checkpoint into an artifact"),
    "evaluate": ("cli.evaluate", "evaluate an artifact: accuracy, calibration (ECE), open set (--ood-dir), heatmaps"),
    "serve": ("cli.serve", "run the HTTP service (uvicorn, one worker; settings from PETVIT_* env)"),
    "predict": ("cli.predict", "classify local images with a local model, no server"),
    "classify": ("cli.classify", "send images to a running service"),
}


# Top-level modules that `pip install '.[train]'` adds to the service's dependencies (pyproject.toml's [train]).
TRAIN_EXTRA = ("matplotlib", "tqdm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petvit", description="Oxford-IIIT Pet breeds with a Vision Transformer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_host_terms()
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / help and exits
        return 2
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as err:
        if err.name not in TRAIN_EXTRA:
            raise
        # `pip install .` is the service alone; training's progress bars and report plots come with the extra.
        print(
            f"petvit {name}: needs {err.name}, part of the training extra: pip install 'petvit[train]'", file=sys.stderr
        )
        return 2
    sub = argparse.ArgumentParser(prog=f"petvit {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except OSError as err:
        if not is_not_writable(err):  # a folder nobody may write is the user's to fix: one line, no traceback
            raise
        print(f"petvit {name}: {not_writable_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
