"""The default toy loop's gradient spikes under settings that might remove them, two seeds each.

    python bench/stability.py [--epochs 100] [--seeds 0 1] [--settings ...] [--name stability] [--keep]     (just bench-stability)

A spike: an optimiser step whose gradient norm (before max_grad_norm's clipping) exceeds 3x the
run's median. In a default `just loop` one step reached pi_theta / pi_old = 192 with a gradient 110x
the median: within an epoch's optimiser steps the policy had moved that far on a few tokens. The
settings: train.ratio_cap C replaces rho by min(rho, C), so such a token gives no gradient
(dual-clip PPO's idea, Ye et al. 2020, arXiv:1912.09729, as a cap on the whole ratio); a smaller or
decaying learning rate moves the policy less per step; one optimiser step an epoch (batch_size 256
= the epoch's 64 x 4 samples) trains only at pi_old = the sampler (r = 1 everywhere, the Tinker
recipe's one step per batch of rollouts); the teacher's top-8 reverse KL (score.top_k 8,
train.topk_reverse_kl 1, kl_coef 0: at every position the exact reverse KL over the teacher's 8
most likely tokens and a tail bucket, instead of the sampled token's one-sample estimate) alone,
beside the sampled token, and with those schedules. bench/spikes.py takes a finished run's spikes apart.
Each setting runs the whole loop of configs/toy.yaml as it was before 2026-12-07 (the sampled token
at a constant learning rate: bench/toy_before.py) with the setting's overrides, every 10 epochs
evaluated, as a user runs it, with one thread (OMP_NUM_THREADS=1), two runs side by side on this
2-core machine: only the spikes and the held-out table are compared, never the time, and with a
fixed thread count they do not depend on what else runs. --keep adds the settings run to those of
the existing results file. Writes bench/results/<name>.json and .md (seeds 2 and 3: --name
stability-seeds23; the top-8 settings: stability-topk and stability-topk-seeds23).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from concurrent.futures import ThreadPoolExecutor

from curves import mean_curve, save as save_results  # bench/ is on sys.path: run as `python bench/stability.py`
from overlap import RESULTS, run

TOP_8 = ("score.top_k=8", "train.kl_coef=0", "train.topk_reverse_kl=1")
ONE_CORE = {"OMP_NUM_THREADS": "1"}  # two runs side by side, a core each: their results do not depend on timing
SETTINGS = {  # name -> (overrides, environment)
    "ratio_cap 0 (off)": (["train.ratio_cap=0"], ONE_CORE),
    "ratio_cap 2": (["train.ratio_cap=2"], ONE_CORE),
    "cosine decay": (["train.lr_scheduler=cosine"], ONE_CORE),
    "learning_rate 5e-4": (["train.learning_rate=5e-4"], ONE_CORE),
    "cosine decay from 2e-3": (["train.lr_scheduler=cosine", "train.learning_rate=2e-3"], ONE_CORE),
    "one step an epoch (batch_size 256), learning_rate 2e-3": (["train.batch_size=256", "train.learning_rate=2e-3"], ONE_CORE),
    "top-8 reverse KL (kl_coef 0)": ([*TOP_8], ONE_CORE),
    "sampled token + top-8 reverse KL": (["score.top_k=8", "train.topk_reverse_kl=1"], ONE_CORE),
    "top-8 reverse KL with one step an epoch (batch_size 256), learning_rate 2e-3": (
        [*TOP_8, "train.batch_size=256", "train.learning_rate=2e-3"], ONE_CORE),
    "top-8 reverse KL with one step an epoch (batch_size 256) and cosine decay from 2e-3": (
        [*TOP_8, "train.batch_size=256", "train.learning_rate=2e-3", "train.lr_scheduler=cosine"], ONE_CORE),
    "top-8 reverse KL with cosine decay": ([*TOP_8, "train.lr_scheduler=cosine"], ONE_CORE),  # the default since 2026-12-07
}


def markdown(result: dict) -> str:
    rows = result["runs"]
    evals = [point["epoch"] for point in next(iter(rows.values()))[0]["curve"]][-3:]
    lines = [
        f"# Gradient spikes of the default toy loop ({result['epochs']} epochs, seeds {result['seeds']})",
        "",
        f"Machine: {result['machine']}. `python bench/stability.py --name {result['name']} --seeds "
        f"{' '.join(map(str, result['seeds']))} --settings <the rows>`. Spike: grad_norm > 3x the run's median "
        "(before clipping to train.max_grad_norm).",
        "",
        "| setting | spikes (per seed) | grad_norm max / median | ratio max | "
        + " | ".join(f"held-out KL @{e}" for e in evals) + f" | their mean, all seeds | accuracy @{evals[-1]} |",
        "|---|---|---|---|" + "---|" * len(evals) + "---:|---|",
    ]
    for name, runs in rows.items():
        def per_seed(value) -> str:
            return " / ".join(value(r) for r in runs)

        lines.append(" | ".join([
            f"| {name}", per_seed(lambda r: str(len(r["spikes"]))),
            per_seed(lambda r: f"{r['grad_norm_max_over_median']:.1f}"), per_seed(lambda r: f"{r['ratio_max']:.1f}"),
            *(per_seed(lambda r, i=i: f"{r['curve'][i]['heldout_reverse_kl']:.3f}") for i in range(-len(evals), 0)),
            f"{statistics.mean(p['heldout_reverse_kl'] for r in runs for p in r['curve'][-len(evals):]):.3f}",
            per_seed(lambda r: f"{r['curve'][-1]['accuracy']:.1%}")]) + " |")
    lines += ["", "The spikes (epoch.step: grad_norm / median, ratio max):", ""]
    for name, runs in rows.items():
        for r in runs:
            spikes = ", ".join(f"{s['epoch']}.{s['step']}: {s['grad_norm_over_median']:.1f}x, {s['ratio_max']:.1f}" for s in r["spikes"])
            lines.append(f"- {name}, seed {r['seed']}: {spikes or 'none'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--name", default="stability", help="results file stem: bench/results/<name>.json and .md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other settings' runs of bench/results/<name>.json (same epochs and seeds; "
                             "run on the same machine: the file does not tell CPUs apart)")
    args = parser.parse_args()
    earlier = {}
    if args.keep:  # checked before hours of runs, not after
        kept = json.loads((RESULTS / f"{args.name}.json").read_text())
        if (kept["epochs"], kept["seeds"]) != (args.epochs, args.seeds):
            raise SystemExit(f"bench/results/{args.name}.json holds other epochs or seeds: run without --keep")
        earlier = {name: rs for name, rs in kept["runs"].items() if name not in args.settings}
    with ThreadPoolExecutor(2) as pool:
        futures = {setting: [pool.submit(run, "toy", setting, seed, args.epochs, 10, "stability", SETTINGS)
                             for seed in args.seeds] for setting in args.settings}
        runs = {**earlier, **{setting: [future.result() for future in pending] for setting, pending in futures.items()}}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "name": args.name, "seeds": args.seeds,
              "epochs": args.epochs, "runs": runs, "curves": {setting: mean_curve([r["curve"] for r in rs]) for setting, rs in runs.items()}}
    save_results(RESULTS, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
