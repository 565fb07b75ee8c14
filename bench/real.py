"""The real world (SmolLM2-135M-Instruct teacher, a 20-layer pruned student, HumanEval prompts):
held-out reverse KL against loop time, wall time and peak resident memory of each stage, for the
sampled-token objective and for top-k reverse KL.

    python bench/real.py [--epochs 12] [--side-by-side]      (just bench-real)

Each objective is one `kd loop` of configs/smollm2-humaneval.yaml, a fresh run. By default the runs
go one after the other, each with both cores; `--side-by-side` runs them at once, one core each
(OMP_NUM_THREADS=1), which halves the benchmark's wall time and makes each epoch slower.
Loop time is counted from the run's first record in metrics.jsonl (after the models loaded) to each
held-out evaluation's end. Writes bench/results/real.json, real.md and the KL curve.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "smollm2-humaneval.yaml"
OBJECTIVES = {
    "sampled token": [],
    "top-32 reverse KL": ["score.top_k=32", "train.kl_coef=0", "train.topk_reverse_kl=1"],
}


def command(name: str, overrides: list[str], epochs: int) -> list[str]:
    run_id = "bench-real-" + name.replace(" ", "-")
    sets = [f"run_id={run_id}", f"epochs={epochs}", *overrides]
    return ["kd", "loop", "-c", str(CONFIG), "--overwrite", *[arg for s in sets for arg in ("--set", s)]]


def summarise(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = records[0]["time"] - records[0]["wall_seconds"]
    stages: dict[str, dict] = {}
    for record in records:
        if "wall_seconds" in record:
            entry = stages.setdefault(record["stage"], {"calls": 0, "seconds": 0.0, "peak_rss_gib": 0.0})
            entry["calls"] += 1
            entry["seconds"] += record["wall_seconds"]
            entry["peak_rss_gib"] = max(entry["peak_rss_gib"], record.get("peak_rss_gib") or 0.0)
    for entry in stages.values():
        entry["mean_seconds"] = entry.pop("seconds") / entry["calls"]
    curve = [{"epoch": r["epoch"], "loop_seconds": round(r["time"] - start, 1), "heldout_reverse_kl": r["heldout_reverse_kl"]}
             for r in records if r["stage"] == "eval"]
    return {"curve": curve, "stages": stages}


def markdown(result: dict) -> str:
    lines = [
        "# Real world: SmolLM2-135M-Instruct -> 20-layer pruned student, HumanEval prompts",
        "",
        f"{result['machine']}; {result['date']}; `python bench/real.py {' '.join(result['argv'])}` "
        f"({'side by side, one core each' if result['side_by_side'] else 'one after the other, two cores each'}). "
        "Config: configs/smollm2-humaneval.yaml (8 prompts x 2 samples of up to 128 tokens per epoch, "
        "LoRA rank 16, lr 1e-3; held-out reverse KL on 16 problems).",
        "",
        "| objective | epochs | held-out reverse KL per evaluation (loop seconds) | last / first |",
        "|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        points = ", ".join(f"{p['heldout_reverse_kl']:.3f} ({p['loop_seconds']:.0f} s)" for p in run["curve"])
        first, last = run["curve"][0]["heldout_reverse_kl"], run["curve"][-1]["heldout_reverse_kl"]
        lines.append(f"| {name} | {run['curve'][-1]['epoch']} | {points} | {last / first:.2f} |")
    lines += ["", "| objective | stage | calls | mean wall s | peak RSS GiB |", "|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        for stage, entry in run["stages"].items():
            lines.append(f"| {name} | {stage} | {entry['calls']} | {entry['mean_seconds']:.1f} | {entry['peak_rss_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    from curves import save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--side-by-side", action="store_true")
    args = parser.parse_args()
    subprocess.run(["kd", "real", "-c", str(CONFIG)], check=True, cwd=ROOT)
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.side_by_side else {})}
    logs = RESULTS / "real-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    processes = {}
    for name, overrides in OBJECTIVES.items():
        with open(logs / f"{name.replace(' ', '-')}.log", "w") as log:
            process = subprocess.Popen(command(name, overrides, args.epochs), cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        if not args.side_by_side:
            process.wait()
        processes[name] = process
    for name, process in processes.items():
        if process.wait():
            raise SystemExit(f"{name}: kd loop failed, see {logs}")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:], "side_by_side": args.side_by_side,
        "runs": {name: summarise(ROOT / "runs" / ("bench-real-" + name.replace(" ", "-"))) for name in OBJECTIVES},
    }
    result["curves"] = {name: run["curve"] for name, run in result["runs"].items()}
    save(RESULTS, "real", result, markdown(result))


if __name__ == "__main__":
    main()
