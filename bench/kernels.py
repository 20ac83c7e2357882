"""Run one learning bench under the three CPU kernel settings and merge its runs: each measure as mean [min, max]
over every (seed, kernel setting) run, each claim as "held in N of M runs", overall and per setting.

A learning figure is published only from such a merge (issue 17): the seed moves it, and so does the CPU's rounding,
which scripts/kernels.sh reproduces on one machine (PyTorch's native AVX512 kernels, its AVX2 kernels with oneDNN held
to AVX2, its portable kernels), each setting in its own subprocess with its own fresh inductor compile cache.

    .venv/bin/python bench/kernels.py distill_digits -- --seeds 0 1 2 3 4 --threads 1
    .venv/bin/python bench/kernels.py open_set_digits --kernels native avx2 -- --seeds 0 1 2

A bench takes part by accepting `--json PATH` and writing there {"machine": evidence.machine(), "claims": {key:
text}, "runs": [{"seed": s, "measures": {name: float}, "claims": {key: bool}}, ...]}. The merge goes to
docs/evidence/<bench>.json (committed: scripts/claims.py builds README's figures from it) with every run's machine,
and its table is printed; each setting's own JSON stays under results/kernels/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import held, held_text, mean_range, spread

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("native", "avx2", "default")


def start_setting(bench: str, setting: str, extra: list[str], raw: Path) -> tuple[subprocess.Popen, Path, float]:
    """The bench in a subprocess under one kernel setting (scripts/kernels.sh: its env and its own compile cache)."""
    out = raw / f"{bench}.{setting}.json"
    command = ["bash", str(ROOT / "scripts/kernels.sh"), setting, sys.executable, str(ROOT / "bench" / f"{bench}.py"),
               *extra, "--json", str(out)]  # fmt: skip
    print(f"[{setting}] {' '.join(command[3:])}", flush=True)
    return subprocess.Popen(command, cwd=ROOT), out, time.perf_counter()


def finish_setting(process: subprocess.Popen, out: Path, tick: float) -> dict[str, Any]:
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(process.args)} failed (exit {process.returncode})")
    doc = json.loads(out.read_text())
    doc["seconds"] = round(time.perf_counter() - tick, 1)
    out.write_text(json.dumps(doc, indent=2))  # with its wall time, for a later --reuse
    return doc


def run_settings(
    bench: str, settings: list[str], extra: list[str], raw: Path, parallel: bool, reuse: bool
) -> dict[str, Any]:
    """Each setting's JSON, one after the other or (--parallel, one core each) side by side; --reuse takes a
    setting's JSON from an earlier run of the same command instead (its seeds must match)."""
    paths = {s: raw / f"{bench}.{s}.json" for s in settings}
    kept = {s: json.loads(paths[s].read_text()) for s in settings if reuse and paths[s].exists()}
    for setting, doc in kept.items():
        print(f"[{setting}] reusing {paths[setting]} (seeds {doc['seeds']})", flush=True)
    todo = [s for s in settings if s not in kept]
    if not parallel:
        done = {s: finish_setting(*start_setting(bench, s, extra, raw)) for s in todo}
    else:
        started = {s: start_setting(bench, s, extra, raw) for s in todo}
        done = {s: finish_setting(*started[s]) for s in todo}
    return {s: kept[s] if s in kept else done[s] for s in settings}


def merge(bench: str, docs: dict[str, dict[str, Any]], command: list[str]) -> dict[str, Any]:
    """Every run tagged with its setting; measures and claims summarised over all runs and per setting."""
    runs = [{"kernels": setting, **run} for setting, doc in docs.items() for run in doc["runs"]]
    texts: dict[str, str] = {}
    for doc in docs.values():
        texts |= doc["claims"]
    measures = sorted({name for run in runs for name in run["measures"]}, key=list(runs[0]["measures"]).index)

    def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "measures": {m: spread([r["measures"][m] for r in rows if m in r["measures"]]) for m in measures},
            "claims": {k: held([r["claims"][k] for r in rows if k in r["claims"]]) for k in texts},
        }

    return {
        "bench": bench,
        "command": command,
        "settings": list(docs),
        "seeds": sorted({run["seed"] for run in runs}),
        "claim_text": texts,
        "all": summarise(runs),
        "per_setting": {s: summarise([r for r in runs if r["kernels"] == s]) for s in docs},
        "machines": {s: doc["machine"] for s, doc in docs.items()},
        "seconds": {s: doc.get("seconds") for s, doc in docs.items()},
        "bench_settings": next(iter(docs.values())).get("settings", {}),
        "runs": runs,
    }


def format_merge(doc: dict[str, Any]) -> str:
    settings = doc["settings"]
    head = f"{doc['bench']}: seeds {doc['seeds']} x kernels {settings}"
    lines = [head, "", f"| measure | all runs | {' | '.join(settings)} |", "| --- | --- |" + " --- |" * len(settings)]
    for name, s in doc["all"]["measures"].items():
        cells = " | ".join(mean_range(doc["per_setting"][k]["measures"][name]) for k in settings)
        lines.append(f"| {name} | {mean_range(s)} | {cells} |")
    lines += ["", f"| claim | all runs | {' | '.join(settings)} |", "| --- | --- |" + " --- |" * len(settings)]
    for key, h in doc["all"]["claims"].items():
        per = [doc["per_setting"][k]["claims"][key] for k in settings]
        cells = " | ".join(f"{p['held']}/{p['runs']}" for p in per)
        verdict = "" if h["stands"] else " (< 80 %: restate)"
        lines.append(f"| {doc['claim_text'][key]} | {held_text(h)}{verdict} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", help="a bench/ module that writes --json (distill_digits, open_set_digits, ...)")
    parser.add_argument("--kernels", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--raw", type=Path, default=ROOT / "results/kernels", help="each setting's own JSON")
    parser.add_argument("--out", type=Path, help="the merge (default: docs/evidence/<bench>.json)")
    parser.add_argument("--parallel", action="store_true", help="run the settings side by side (a core each)")
    parser.add_argument("--reuse", action="store_true", help="take a setting's JSON from --raw when it is there")
    args = parser.parse_args(ours)
    args.raw.mkdir(parents=True, exist_ok=True)
    docs = run_settings(args.bench, args.kernels, extra, args.raw, args.parallel, args.reuse)
    command = ["bench/kernels.py", args.bench, "--kernels", *args.kernels, "--", *extra]
    doc = merge(args.bench, docs, command)
    out = args.out or ROOT / "docs/evidence" / f"{args.bench}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n" + format_merge(doc) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
