"""Write the measured learning claims into README.md, docs/models.md and docs/trust.md from the benches' merged JSON
(docs/evidence/<bench>.json, written by bench/kernels.py): every claim as "held in N of M runs" over seeds x CPU
kernel settings, every figure as mean [min, max], each block naming the machine, torch and the kernels it ran on.

Only the text between `<!-- claims:NAME -->` and `<!-- /claims:NAME -->` is replaced, so the prose around it stays
hand-written; the figures inside never are. A claim that held in fewer than 80 % of its runs is printed as not
reliable, and the prose must not repeat it.

    .venv/bin/python scripts/claims.py           # rewrite the blocks
    .venv/bin/python scripts/claims.py --check   # exit 1 when a block is not what the JSON says
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.evidence import held_text, mean_range  # noqa: E402
from bench.kernels import format_merge  # noqa: E402

EVIDENCE = ROOT / "docs/evidence"
# README's short form: per bench, the figures worth a line (measure key -> words).
HEADLINE = {
    "distill_digits": {"alone": "ViT alone", "hard": "distilled hard", "soft": "distilled soft", "teacher": "teacher"},
    "open_set_digits": {
        "ece_before": "held-out ECE before",
        "ece_after": "after temperature",
        "auroc_mahalanobis_digits": "AUROC vs digits 5-9: Mahalanobis",
        "auroc_msp_digits": "max softmax",
        "auroc_energy_digits": "energy",
    },
    "heatmap_localisation": {"default_pointing": "default heatmap pointing", "default_mass": "mass on the digit"},
    "dtype_agreement": {
        "int8_agreement": "int8 top-1 agreement with float32",
        "bf16_cast_agreement": "bfloat16 (cast)",
        "bf16_autocast_agreement": "bfloat16 (autocast)",
    },
    "fashion_mnist": {
        "alone": "Fashion-MNIST test top-1: ViT alone",
        "hard": "distilled hard",
        "soft": "distilled soft",
        "teacher": "resnet18 teacher",
        "int8_agreement": "int8 agreement with float32",
    },
}
TITLES = {
    "distill_digits": "Distillation on real digits (bench/distill_digits.py)",
    "open_set_digits": "Calibration and the open set on real digits (bench/open_set_digits.py)",
    "heatmap_localisation": "Heatmap localisation on pasted digits (bench/heatmap_localisation.py)",
    "dtype_agreement": "bfloat16 and int8 against float32 on held-out digits (bench/dtype_agreement.py)",
    "fashion_mnist": "Fashion-MNIST, petvit's own recipes (bench/fashion_mnist.py)",
}
# Which file holds which block: README gets the summary of all, the docs the full tables of theirs.
BLOCKS = {
    "README.md": {"summary": None},
    "docs/models.md": {"distill_digits": "distill_digits", "fashion_mnist": "fashion_mnist"},
    "docs/trust.md": {
        "open_set_digits": "open_set_digits",
        "heatmap_localisation": "heatmap_localisation",
        "dtype_agreement": "dtype_agreement",
    },
}


def load(bench: str) -> dict[str, Any] | None:
    path = EVIDENCE / f"{bench}.json"
    return json.loads(path.read_text()) if path.exists() else None


def where(doc: dict[str, Any]) -> str:
    """Seeds, kernel settings, runs, machine and torch of one merge, in a sentence."""
    machine = next(iter(doc["machines"].values()))
    cpu = machine["cpu"]
    flags = ", ".join(f for f in cpu["kernel_flags"] if f.startswith(("avx512_", "amx"))) or "no AVX512-BF16/VNNI"
    per = {s: sorted(r["seed"] for r in doc["runs"] if r["kernels"] == s) for s in doc["settings"]}
    if len({tuple(seeds) for seeds in per.values()}) == 1:
        grid = f"seeds {', '.join(map(str, doc['seeds']))} x kernels {' / '.join(doc['settings'])}"
    else:  # not every setting ran every seed: say which did
        grid = "; ".join(f"kernels {s}: seeds {', '.join(map(str, seeds))}" for s, seeds in per.items())
    return (f"{grid} = {len(doc['runs'])} runs on "
            f"{cpu['model']} ({cpu['logical_cpus']} logical CPUs; {flags}), torch {machine['torch']}, one thread; "
            f"`.venv/bin/python {' '.join(doc['command'])}`")  # fmt: skip


def full_block(doc: dict[str, Any] | None, bench: str) -> str:
    if doc is None:
        return f"Not measured yet: run `.venv/bin/python bench/kernels.py {bench}`."
    table = format_merge(doc).split("\n", 2)[2]  # the tables, without format_merge's one-line heading
    return f"Measured over {where(doc)}. Per kernel setting: mean [min, max] and claims held / runs.\n\n{table}"


def summary_block() -> str:
    lines = []
    for bench, title in TITLES.items():
        doc = load(bench)
        if doc is None:
            continue
        figures = "; ".join(
            f"{words} {mean_range(doc['all']['measures'][key])}"
            for key, words in HEADLINE[bench].items()
            if key in doc["all"]["measures"]
        )
        lines.append(f"- **{title}**, {where(doc)}.{' ' + figures + '.' if figures else ''}")
        for key, h in doc["all"]["claims"].items():
            verdict = held_text(h) if h["stands"] else f"**not reliable**, {held_text(h)}"
            lines.append(f"  - {doc['claim_text'][key]}: {verdict}")
    if not lines:
        return "Not measured yet: run `bench/kernels.py` for each learning bench."
    return "\n".join(["Mean [min, max] over every run; a claim held in fewer than 80 % of runs is marked.", "", *lines])


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- claims:{name} -->\n)(?:.*?\n)?(<!-- /claims:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- claims:{name} --> ... <!-- /claims:{name} --> block to fill")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for file, blocks in BLOCKS.items():
        path = ROOT / file
        text = before = path.read_text()
        for name, bench in blocks.items():
            body = summary_block() if bench is None else full_block(load(bench), bench)
            text = replace_block(text, name, body)
        if text != before:
            stale.append(file)
            if not args.check:
                path.write_text(text)
    verb = "out of date" if args.check else "rewrote"
    print(f"{verb}: {', '.join(stale)}" if stale else "up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
