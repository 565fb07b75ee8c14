"""The overlapped loop against the synchronous one: wall time per epoch and held-out reverse KL per
epoch and per second of loop, at max_staleness 0, 1 and 2, two seeds each.

    python bench/overlap.py [--world toy|real] [--epochs 30] [--seeds 0 1]     (just bench-overlap)

Each run is `kd loop` as a user runs it, on an idle machine, one at a time (the toy's with the
sampled-token objective at the constant learning rate it was measured with: bench/toy_before.py).
The settings:
- synchronous, every core: max_staleness 0, torch's default threads (the loop users get today);
- synchronous, one core: max_staleness 0 with OMP_NUM_THREADS=1, the speed each side of the
  overlapped loop has on this 2-core machine;
- overlapped, s = 1 and s = 2: the sampling side (eval, generate, score) on one core in its worker
  process, the training side (train, export-lora) on the other (overlap.*_threads 1).
On a 2-core CPU the overlapped loop splits the same cores the synchronous one uses whole, so it can
only win where a stage does not scale with its threads; against the one-core synchronous loop it
shows what the pipelining itself gives when each side has hardware of its own (the case of a GPU
node, where the engines and the trainer take different GPUs: overlap.sampler_devices).
Epoch wall time: the median interval between consecutive epochs' export-lora records in
metrics.jsonl (evaluations included where they fall), and the whole loop's wall time.
Writes bench/results/overlap[-real].json and .md (--name: another stem), and the curves' PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from curves import mean_curve, save as save_results  # bench/ is on sys.path: run as `python bench/overlap.py`
from toy_before import pinned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORLDS = {"toy": ("configs/toy.yaml", "toy"), "real": ("configs/smollm2-humaneval.yaml", "real")}
SETTINGS = {  # name -> (overrides, environment)
    "synchronous, 2 cores": ([], {}),
    "synchronous, 1 core": ([], {"OMP_NUM_THREADS": "1"}),
    "overlapped s=1, 1+1 cores": (["max_staleness=1", "overlap.sampler_threads=1", "overlap.trainer_threads=1"], {}),
    "overlapped s=2, 1+1 cores": (["max_staleness=2", "overlap.sampler_threads=1", "overlap.trainer_threads=1"], {}),
}


def run(world: str, name: str, seed: int, epochs: int, eval_every: int, bench: str = "overlap",
        settings: dict = SETTINGS) -> dict:
    """One `kd loop` of setting `name` of `settings` (its overrides and environment): its epoch wall
    time, stage seconds, held-out curve and train-step statistics, read from its metrics.jsonl."""
    overrides, env = settings[name]
    config, _ = WORLDS[world]
    tag = "".join(c for c in name.split(",")[0] if c.isalnum() or c in "._-")
    run_id = f"bench-{bench}-{world}-{tag}-{env and 'c1' or 'cN'}-seed{seed}"
    shutil.rmtree(ROOT / "runs" / run_id, ignore_errors=True)
    command = ["kd", "loop", "--config", str(ROOT / config), "--run", run_id, "--set", f"epochs={epochs}",
               "--set", f"eval.every={eval_every}", "--set", f"seed={seed}"]
    for override in (*pinned(config), *overrides):
        command += ["--set", override]
    print(f"== {name}, seed {seed}: {' '.join(command)}", flush=True)
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**environment, **env})
    wall = time.time() - started
    records = [json.loads(line) for line in (ROOT / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    exports = sorted(r["time"] for r in records if r["stage"] == "export-lora")
    first = min(r["time"] - r.get("wall_seconds", 0.0) for r in records)
    steps = [r for r in records if r["stage"] == "train_step"]
    grad_norms = [r["grad_norm"] for r in steps if r["grad_norm"] is not None]
    median = statistics.median(grad_norms)
    curve = sorted(({"epoch": r["epoch"], "loop_seconds": r["time"] - first, "heldout_reverse_kl": r["heldout_reverse_kl"],
                     "accuracy": r["accuracy"]} for r in records if r["stage"] == "eval"), key=lambda p: p["epoch"])
    return {
        "seed": seed, "wall_seconds": wall, "curve": curve,
        "epoch_seconds": statistics.median(b - a for a, b in zip(exports, exports[1:])),
        "stage_seconds": {stage: statistics.mean(r["wall_seconds"] for r in records if r["stage"] == stage)
                          for stage in ("generate", "score", "train", "eval")},
        "grad_norm_max_over_median": max(grad_norms) / median,
        "spikes": [{"epoch": r["epoch"], "step": r["step"], "grad_norm_over_median": r["grad_norm"] / median,
                    "ratio_max": r["ratio_max"]} for r in steps if r["grad_norm"] is not None and r["grad_norm"] > 3 * median],
        "ratio_max": max(r["ratio_max"] for r in steps),
        "is_weight_max": max(r["is_weight_max"] for r in steps),
        "is_corrected_fraction": statistics.mean(r["is_corrected_fraction"] for r in steps),
        "mismatch": statistics.mean(r["mismatch"] for r in steps),
    }


def markdown(world: str, result: dict, epochs: int, name: str) -> str:
    rows = result["runs"]
    reference = statistics.mean(r["epoch_seconds"] for r in rows["synchronous, 2 cores"])
    single = (statistics.mean(r["epoch_seconds"] for r in rows["synchronous, 1 core"])
              if "synchronous, 1 core" in rows else None)
    evals = [point["epoch"] for point in rows["synchronous, 2 cores"][0]["curve"]]
    lines = [
        f"# Overlapped loop vs synchronous ({world} world, {epochs} epochs)",
        "",
        f"Machine: {result['machine']}. `python bench/overlap.py --world {world} --epochs {epochs} --eval-every "
        f"{result['eval_every']} --settings ... --seeds ...{'' if name == default_name(world) else f' --name {name}'}` "
        "(each row names its seeds); each run alone on the machine. "
        "Epoch wall s: each run's median interval between epochs, averaged over the seeds.",
        "",
        "| setting | seeds | epoch wall s | vs sync 2 cores | vs sync 1 core | loop wall s | "
        + " | ".join(f"held-out KL @{e}" for e in evals) + " | grad_norm max / median | ratio max | IS weight max | IS corrected |",
        "|---|---|---|---|---|---|" + "---|" * len(evals) + "---|---|---|---|",
    ]
    for setting, runs in rows.items():
        epoch = statistics.mean(r["epoch_seconds"] for r in runs)
        kls = [[point["heldout_reverse_kl"] for point in r["curve"]] for r in runs]
        cells = [" / ".join(f"{kl[i]:.4f}" for kl in kls) for i in range(len(evals))]
        lines.append(
            f"| {setting} | {', '.join(str(r['seed']) for r in runs)} | {epoch:.2f} | {epoch / reference:.2f}x | "
            f"{f'{epoch / single:.2f}x' if single else 'not run'} | "
            f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} | " + " | ".join(cells)
            + f" | {max(r['grad_norm_max_over_median'] for r in runs):.2f} | {max(r['ratio_max'] for r in runs):.2f} | "
            f"{max(r['is_weight_max'] for r in runs):.2f} | {statistics.mean(r['is_corrected_fraction'] for r in runs):.2%} |")
    lines += ["", "Mean stage seconds per call (generate / score / train / eval):", ""]
    for setting, runs in rows.items():
        stage = {key: statistics.mean(r["stage_seconds"][key] for r in runs) for key in runs[0]["stage_seconds"]}
        lines.append(f"- {setting}: " + " / ".join(f"{stage[key]:.2f}" for key in ("generate", "score", "train", "eval")))
    return "\n".join(lines) + "\n"


def default_name(world: str) -> str:
    return "overlap" if world == "toy" else f"overlap-{world}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="toy")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--name", help="the results files' stem (default: overlap, or overlap-real with --world real); "
                        "the settings and seeds not re-run keep that file's earlier runs")
    args = parser.parse_args()
    name = args.name or default_name(args.world)
    earlier = RESULTS / f"{name}.json"  # (setting, seed) pairs not re-run keep their earlier runs of the same length
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    same = (kept.get("epochs"), kept.get("eval_every")) == (args.epochs, args.eval_every)
    # Settings may differ in seeds (a speed-only reference run once), so each row names its own.
    runs = kept["runs"] if kept and same else {}
    if "synchronous, 2 cores" not in runs and "synchronous, 2 cores" not in args.settings:
        raise SystemExit(f"bench/overlap.py: {earlier} has no runs of 'synchronous, 2 cores' with --epochs {args.epochs} "
                         f"--eval-every {args.eval_every}, the reference of every row; include it in --settings")
    if args.world == "real":
        subprocess.run(["kd", "real", "-c", str(ROOT / WORLDS["real"][0])], cwd=ROOT, check=True)
    for setting in args.settings:
        fresh = [run(args.world, setting, seed, args.epochs, args.eval_every) for seed in args.seeds]
        runs[setting] = sorted([r for r in runs.get(setting, []) if r["seed"] not in args.seeds] + fresh,
                               key=lambda r: r["seed"])
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "epochs": args.epochs, "eval_every": args.eval_every,
              "runs": runs, "curves": {setting: mean_curve([r["curve"] for r in rs]) for setting, rs in runs.items()}}
    save_results(RESULTS, name, result, markdown(args.world, result, args.epochs, name))


if __name__ == "__main__":
    main()
