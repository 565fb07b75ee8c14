"""kd against TRL's on-policy distiller, head to head on the toy world: the same objective, several
seeds, and the wall time each needs to reach a series of held-out reverse KLs.

    python bench/vs_trl.py [--epochs 80] [--seeds 0 1 2 3]        (just bench-vs-trl)

- kd: `kd loop` with the teacher's whole next-token distribution (score.top_k = the vocabulary,
  train.topk_reverse_kl 1, train.kl_coef 0), one sample for each of 256 prompts per epoch, 64
  samples per optimiser step (4 steps per epoch): the best toy setting of bench/topk.py.
- TRL: `trl.DistillationTrainer` with beta = 1 (reverse KL over the whole vocabulary), one
  completion for each of 64 prompts per step, same student, teacher, LoRA, learning rate and
  warm-up, for the mean training seconds of the kd runs (bench/topk.py's `run_trl`).
Training seconds exclude evaluation; every policy is evaluated by `kd.stages.evaluate.evaluate` on the
256 held-out prompts, every 20 optimiser steps for both, and afterwards every one of those
checkpoints again on the same held-out draws (COMMON_SALTS), which is what the tables and plots
show. One evaluation still moves by a few hundredths of KL from one to the next, so the curves are
averaged over the seeds before anything is read off them.
Writes bench/results/vs_trl.json, vs_trl.md and the curves' PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from curves import mean_curve, save as save_results  # bench/ is on sys.path: run as `python bench/vs_trl.py`
from topk import TRL_DISTILLATION, at_time, first_reaching, kd_run_id, run_kd, run_trl, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KD = "kd, full-vocabulary reverse KL, 1 sample x 256 prompts per epoch"
THRESHOLDS = (0.2, 0.15, 0.1, 0.07, 0.05)
STEPS_PER_EVAL = 20
PREFIX = "bench-vs-trl-"
# Each evaluation during training draws its own held-out samples (its seeds are salted with the
# epoch or step), so two curves differ by sampling noise too. Afterwards every checkpoint of both
# tools is evaluated again on these same draws: 2 x 256 samples per checkpoint.
COMMON_SALTS = (9001, 9002)


def kd_overrides(vocabulary: int, seed: int) -> list[str]:
    return [f"seed={seed}", f"score.top_k={vocabulary}", "train.kl_coef=0", "train.topk_reverse_kl=1",
            "train.batch_size=64", "generate.prompts_per_epoch=256", "generate.samples_per_prompt=1"]


def evaluation_session():
    """One toy-world session (student, teacher, the 256 held-out prompts) for all re-evaluations."""
    from kd.stages import config as config_lib
    from kd.stages.session import Session

    config = config_lib.load(ROOT / "configs" / "toy.yaml")
    return Session(dataclasses.replace(config, eval=dataclasses.replace(config.eval, num_prompts=0)), progress=False)


def on_common_draws(session, curve: list[dict], adapters: list[Path | None]) -> list[dict]:
    """`curve` with each point's held-out KL and accuracy measured again, on the COMMON_SALTS draws."""
    from kd.stages.evaluate import evaluate

    points = []
    for point, adapter in zip(curve, adapters):
        stats = [evaluate(session, adapter, salt)[1] for salt in COMMON_SALTS]
        points.append({**point, "heldout_reverse_kl": sum(s["heldout_reverse_kl"] for s in stats) / len(stats),
                       "accuracy": sum(s["accuracy"] for s in stats) / len(stats)})
    return points


def kd_adapters(seed: int, curve: list[dict]) -> list[Path | None]:
    """The adapter each evaluated epoch's policy samples with (the base student at epoch 0)."""
    run = ROOT / "runs" / kd_run_id(f"{KD} seed {seed}", PREFIX)
    return [None if point["epoch"] == 0 else run / f"{point['epoch'] - 1:04d}" / "adapter" for point in curve]


def late_mean(curve: list[dict]) -> float:
    """Mean held-out KL of the evaluations in the last third of the curve's training time."""
    late = [point["heldout_reverse_kl"] for point in curve if point["train_seconds"] >= 2 / 3 * curve[-1]["train_seconds"]]
    return sum(late) / len(late)


def markdown(result: dict) -> str:
    curves = result["curves"]
    seeds = " ".join(map(str, result["seeds"]))
    during = "; ".join(f"{name} {curve[-1]['heldout_reverse_kl']:.4f}" for name, curve in result["training_curves"].items())
    lines = [
        "# kd vs TRL DistillationTrainer, head to head (toy world)",
        "",
        f"{result['date']}, {result['machine']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())}. "
        f"`python bench/vs_trl.py --epochs {result['epochs']} --seeds {seeds}`. Curves are means over the seeds; "
        "training seconds exclude evaluation. Every checkpoint of both is evaluated on the same held-out draws "
        f"({len(COMMON_SALTS)} x 256 samples); the evaluations during training, each on draws of its own, ended at: "
        f"{during}.",
        "",
        "| run | training s | optimiser steps | final held-out KL (each seed) | final accuracy |",
        "|---|---:|---:|---|---:|",
    ]
    for name, curve in curves.items():
        each = ", ".join(f"{c[-1]['heldout_reverse_kl']:.4f}" for c in result["seed_curves"][name])
        lines.append(f"| {name} | {curve[-1]['train_seconds']:.1f} | {curve[-1]['steps']:.0f} "
                     f"| {curve[-1]['heldout_reverse_kl']:.4f} ({each}) | {curve[-1]['accuracy']:.1%} |")
    lines += ["", "Training seconds until the mean curve first reaches a held-out reverse KL:", "",
              "| held-out KL <= | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for threshold in THRESHOLDS:
        cells = [first_reaching(curve, threshold) for curve in curves.values()]
        lines.append(f"| {threshold} | " + " | ".join("not reached" if c is None else f"{c:.1f}" for c in cells) + " |")
    trl_final = curves[TRL_DISTILLATION][-1]["heldout_reverse_kl"]
    reach = {name: first_reaching(curve, trl_final) for name, curve in curves.items()}
    lines += ["", f"TRL's final held-out KL, {trl_final:.4f}, is first reached by the mean curves at: "
              + "; ".join(f"{name} {'never' if t is None else f'{t:.1f} s'}" for name, t in reach.items()) + ".",
              "One evaluation moves by a few hundredths from the next, so also the mean held-out KL of the "
              "evaluations in the last third of the training time: "
              + "; ".join(f"{name} {late_mean(curve):.4f}" for name, curve in curves.items()) + "."]
    lines += ["", "Held-out KL / accuracy of the mean curve at equal training time (last evaluation before it):", "",
              "| training s | " + " | ".join(curves) + " |", "|---:|" + "---|" * len(curves)]
    common = min(curve[-1]["train_seconds"] for curve in curves.values())
    for seconds in [s for s in (15, 30, 45, 60, 75, 90, 105) if s < common] + [common]:
        points = [at_time(curve, seconds) for curve in curves.values()]
        lines.append(f"| {seconds:.0f} | " + " | ".join(f"{p['heldout_reverse_kl']:.3f} / {p['accuracy']:.0%}" for p in points) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    options = parser.parse_args()
    if not (ROOT / "runs" / "toy-world" / "toy.json").is_file():
        subprocess.run(["kd", "toy"], cwd=ROOT, check=True)
    vocabulary = json.loads((ROOT / "runs" / "toy-world" / "toy.json").read_text())["vocab_size"]
    steps_per_epoch = 256 // 64
    kd_runs = [
        [{**point, "steps": point["epoch"] * steps_per_epoch}
         for point in run_kd(f"{KD} seed {seed}", kd_overrides(vocabulary, seed), options.epochs,
                             STEPS_PER_EVAL // steps_per_epoch, prefix=PREFIX)]
        for seed in options.seeds
    ]
    budget = sum(run[-1]["train_seconds"] for run in kd_runs) / len(kd_runs)
    print(f"== {TRL_DISTILLATION}, {budget:.0f} s of training per seed", flush=True)
    trl_adapters = {seed: ROOT / "runs" / f"{PREFIX}trl-seed-{seed}" for seed in options.seeds}
    trl_runs = []
    for seed, adapters in trl_adapters.items():
        shutil.rmtree(adapters, ignore_errors=True)
        adapters.mkdir(parents=True)
        trl_runs.append([{("steps" if key == "step" else key): value for key, value in point.items()}
                         for point in run_trl(budget, STEPS_PER_EVAL, seed=seed, adapters=adapters)])
    # A TRL run stops on the clock: its last evaluation can fall at a different step in each seed, so
    # only the evaluations every seed has are averaged (the kd runs evaluate at the same epochs).
    shortest = min(len(run) for run in trl_runs)
    seed_curves = {KD: kd_runs, TRL_DISTILLATION: [run[:shortest] for run in trl_runs]}
    print(f"== every checkpoint on the same held-out draws (salts {COMMON_SALTS})", flush=True)
    with evaluation_session() as session:
        common_seed_curves = {
            KD: [on_common_draws(session, run, kd_adapters(seed, run)) for seed, run in zip(options.seeds, kd_runs)],
            TRL_DISTILLATION: [
                on_common_draws(session, run,
                                [None if p["steps"] == 0 else trl_adapters[seed] / f"step-{p['steps']}" for p in run])
                for seed, run in zip(options.seeds, seed_curves[TRL_DISTILLATION])
            ],
        }
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only",
        "versions": versions(), "epochs": options.epochs, "seeds": options.seeds, "common_salts": COMMON_SALTS,
        # "curves" (plotted): on the common draws; "training_curves": as evaluated during training
        "curves": {name: mean_curve(runs) for name, runs in common_seed_curves.items()}, "seed_curves": common_seed_curves,
        "training_curves": {name: mean_curve(runs) for name, runs in seed_curves.items()}, "training_seed_curves": seed_curves,
    }
    save_results(RESULTS, "vs_trl", result, markdown(result))


if __name__ == "__main__":
    main()
