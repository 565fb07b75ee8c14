"""On-policy against off-policy distillation on a task the real pair differs on: the pruned student's
held-out accuracy and reverse KL against loop time and teacher tokens, with the teacher's accuracy as
the line to reach (the real world's arithmetic task: configs/smollm2-arithmetic.yaml).

    python bench/quality.py [--epochs 60] [--eval-every 10] [--seeds 0 1] [--arms ARM ...]
                            [--set KEY=VALUE]... [--name quality]           (just bench-quality)

--arms runs some of the five arms below (all by default; a table without off-policy says so in its
last column); --set, repeatable, overrides the config for every arm and the baselines, after each
arm's own keys (so `--set score.top_k=32` sets the top-k arms' k; `kd real` builds the world they
name); --name is the results files' stem and the runs' prefix: the on-policy runs are kept in
runs/bench-<name>-<arm>-seed<s>, and the evaluations of off-policy (runs/bench-<name>-off-policy-seed<s>)
and of the baselines (runs/bench-<name>-teacher, -student) as kd eval datasets beside them, so that
bench/answers.py reads every arm's replies the same way.

- on-policy, sampled token (`sampled`): `kd loop` with the config as shipped (reverse KL on the
  sampled token);
- on-policy, top-k reverse KL (`topk`): the same with the teacher's top-16 reverse KL
  (score.top_k=16, train.kl_coef=0, train.topk_reverse_kl=1);
- on-policy, top-k forward KL (`topk-forward`): the teacher's top-16 forward KL on the student's own
  samples (train.topk_forward_kl=1 instead), the on-policy GKD of Agarwal et al. 2024
  (arXiv:2306.13649) with beta = 0: its gradient on a token's logit is p_student - p_teacher, so it
  raises a token the teacher expects (the end of the turn) however unlikely the student finds it,
  where reverse KL's gradient is scaled by the student's own probability;
- off-policy (`off-policy`): SFT of the same LoRA on the teacher's own samples of the prompts kd's
  generate would choose, the same optimiser batch and learning rate (bench/offpolicy.py's
  `run_off_policy`); the teacher samples at generate.temperature (1 by default), as the student does
  on-policy, so its samples are right about as often as its sampled accuracy at that temperature
  (the line to reach is its greedy accuracy);
- off-policy, verified (`off-policy-verified`): the same SFT on only the teacher samples the task's
  verifier accepts (rejection-sampling fine-tuning), the off-policy counterpart of on-policy with the
  verifier's reward in the advantage (`--set train.reward_coef=1`); it spends the same teacher tokens
  per epoch and trains on fewer samples. Its runs are kept in
  runs/bench-<name>-off-policy-verified-seed<s>.
Both off-policy arms take train.passes passes over each epoch's samples, as `kd train` does.
Teacher tokens: the completion tokens the teacher scores (on-policy) or generates (off-policy). Loop
seconds: the stages' wall time (generate, score, train, export-lora; the evaluations left out), and
for off-policy the sampling and SFT time. Every policy is evaluated by kd.stages.evaluate on the
same held-out questions: greedy accuracy (the task metric), the T = 1 samples' accuracy and reverse
KL. The teacher's and the student's accuracy are measured the same way, with the teacher evaluated
as if it were the student. Writes bench/results/<name>.json, .md and the curves' PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from curves import mean_curve, point_table, save as save_results  # bench/ is on sys.path: run as `python bench/quality.py`
from offpolicy import check_verifiable, run_off_policy, run_on_policy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = "configs/smollm2-arithmetic.yaml"
OFF_POLICY = "off-policy (SFT on teacher samples)"
OFF_POLICY_ARMS = {"off-policy": (OFF_POLICY, False),  # --arms name: (row name, SFT on verified samples only)
                   "off-policy-verified": ("off-policy, verified (SFT on the teacher samples its verifier accepts)", True)}
TOP_K = ["score.top_k=16", "train.kl_coef=0"]
ON_POLICY = {  # --arms name: (row name, the config overrides of its `kd loop`)
    "sampled": ("on-policy, sampled token (kd)", []),
    "topk": ("on-policy, top-16 reverse KL (kd)", [*TOP_K, "train.topk_reverse_kl=1"]),
    "topk-forward": ("on-policy, top-16 forward KL (kd)", [*TOP_K, "train.topk_forward_kl=1"]),
}


def baselines(seed: int, overrides: list[str], name: str) -> dict:
    """The teacher's and the untrained student's held-out accuracy (greedy and sampled, `seed`'s samples)
    and the share of their replies truncated at eval.max_new_tokens, by the evaluation every run uses
    (the config with `overrides`); each evaluation is also kept as runs/bench-<name>-<role>/0000/eval."""
    from kd.stages import config as config_lib
    from kd.stages.evaluate import evaluate, write
    from kd.stages.session import Session

    config = config_lib.load(ROOT / CONFIG, [f"seed={seed}", *overrides])
    found = {}
    for role, model in (("teacher", config.teacher), ("student", config.student)):
        as_student = dataclasses.replace(config, student=model)
        with Session(as_student, progress=False) as session:
            started = time.time()
            table, stats = evaluate(session, None, 0)
        kept = ROOT / "runs" / f"bench-{name}-{role}"
        shutil.rmtree(kept, ignore_errors=True)
        write(kept / "0000" / "eval", as_student, table, stats, None, started)
        found[role] = {"accuracy": stats["accuracy"], "sampled_accuracy": stats["sampled_accuracy"],
                       "heldout_reverse_kl": stats["heldout_reverse_kl"]}
        for decoding in ("greedy", "sample"):
            rows = [row for row in table.select(["decoding", "completion_token_ids", "finish_reason"]).to_pylist()
                    if row["decoding"] == decoding]
            found[role][f"{decoding}_tokens"] = sum(len(row["completion_token_ids"]) for row in rows) / len(rows)
            found[role][f"{decoding}_truncated"] = sum(row["finish_reason"] == "length" for row in rows) / len(rows)
        print(f"   {role}: {found[role]}", flush=True)
    return found


def reached(curve: list[dict], accuracy: float, axis: str) -> float | None:
    """The first value of `axis` at which `curve`'s greedy accuracy is at least `accuracy`."""
    return next((point[axis] for point in curve if point["accuracy"] >= accuracy - 1e-9), None)


def markdown(result: dict) -> str:
    teacher, student = result["baselines"]["teacher"], result["baselines"]["student"]
    half = student["accuracy"] + (teacher["accuracy"] - student["accuracy"]) / 2
    off = result["curves"].get(OFF_POLICY)
    target = f" ({off[-1]['accuracy']:.1%})" if off else ""
    lines = [
        "# On-policy vs off-policy distillation on the real world's arithmetic task",
        "",
        f"{result['date']}, {result['machine']}. `python bench/quality.py --epochs {result['epochs']} --eval-every "
        f"{result['eval_every']} --seeds {' '.join(map(str, result['seeds']))} --arms {' '.join(result['arms'])}"
        f"{''.join(' --set ' + shlex.quote(override) for override in result['overrides'])}"
        f"{'' if result['name'] == 'quality' else ' --name ' + shlex.quote(result['name'])}` ({CONFIG}); each run alone on the "
        f"machine. The baselines sample with seed {result['seeds'][0]}; every other number is the mean over "
        "the seeds, evaluation by evaluation. Loop s: the stages' wall time, evaluations left out.",
        "",
        f"| model | greedy accuracy | sampled accuracy | held-out reverse KL | mean reply tokens (greedy / sampled) "
        f"| truncated at {result['max_new_tokens']} tokens (greedy / sampled) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role, found in (("teacher", teacher), ("student (pruned, untrained)", student)):
        lines.append(f"| {role} | {found['accuracy']:.1%} | {found['sampled_accuracy']:.1%} | "
                     f"{found['heldout_reverse_kl']:.4f} | {found['greedy_tokens']:.1f} / {found['sample_tokens']:.1f} | "
                     f"{found['greedy_truncated']:.1%} / {found['sample_truncated']:.1%} |")
    lines += [
        "",
        f"| run | final accuracy | of each seed | final sampled accuracy | final KL | loop s | teacher tokens "
        f"| loop s to half the gap ({half:.1%}) | teacher tokens to off-policy's final accuracy{target} |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def gap(seconds: float | None) -> str:
        if teacher["accuracy"] <= student["accuracy"]:
            return "no gap: the teacher is not better"
        return "not reached" if seconds is None else f"{seconds:.0f}"

    def share(tokens: float | None) -> str:
        if off is None:
            return "off-policy not run"
        if off[-1]["accuracy"] <= student["accuracy"]:
            return "off-policy did not beat the untrained student"
        return "not reached" if tokens is None else f"{tokens:.0f} ({tokens / max(off[-1]['teacher_tokens'], 1):.0%})"

    for name, curve in result["curves"].items():
        each = ", ".join(f"{seed[-1]['accuracy']:.1%}" for seed in result["seed_curves"][name])
        lines.append(f"| {name} | {curve[-1]['accuracy']:.1%} | {each} | {curve[-1]['sampled_accuracy']:.1%} | "
                     f"{curve[-1]['heldout_reverse_kl']:.4f} | {curve[-1]['train_seconds']:.0f} | "
                     f"{curve[-1]['teacher_tokens']:.0f} | {gap(reached(curve, half, 'train_seconds'))} | "
                     f"{share(reached(curve, off[-1]['accuracy'], 'teacher_tokens') if off else None)} |")
    lines += ["", *point_table(result["curves"], [
        ("epoch", "epoch", ".0f"), ("loop s", "train_seconds", ".0f"), ("teacher tokens", "teacher_tokens", ".0f"),
        ("accuracy", "accuracy", ".1%"), ("sampled accuracy", "sampled_accuracy", ".1%"),
        ("held-out KL", "heldout_reverse_kl", ".4f")])]
    return "\n".join(lines) + "\n"


def main() -> None:
    from kd.stages import config as config_lib

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    arms = [*ON_POLICY, *OFF_POLICY_ARMS]
    parser.add_argument("--arms", nargs="+", choices=arms, default=arms)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm and the baselines, after the arm's own (as kd loop "
                             "--set takes it; repeatable)")
    parser.add_argument("--name", default="quality", help="the results files' stem and the runs' prefix (the default "
                        "overwrites the shipped bench/results/quality.md: name a run of your own)")
    options = parser.parse_args()
    options.arms = list(dict.fromkeys(options.arms))
    for override in options.overrides:
        # The runners set these per run, and the table's header states them from the options.
        if override.partition("=")[0].strip() in ("seed", "epochs", "eval.every"):
            parser.error(f"--set {override}: use --seeds, --epochs or --eval-every")
    subprocess.run(["kd", "real", "--config", str(ROOT / CONFIG), *(f"--set={override}" for override in options.overrides)],
                   cwd=ROOT, check=True)
    if any(OFF_POLICY_ARMS[arm][1] for arm in options.arms if arm in OFF_POLICY_ARMS):  # before hours of other arms
        check_verifiable(config_lib.load(ROOT / CONFIG, options.overrides))
    found = baselines(options.seeds[0], options.overrides, options.name)
    seed_curves = {ON_POLICY[arm][0]: [run_on_policy(f"bench-{options.name}-{arm}", [*ON_POLICY[arm][1], *options.overrides],
                                                     options.epochs, options.eval_every, seed, CONFIG, None)
                                       for seed in options.seeds]
                   for arm in options.arms if arm in ON_POLICY}
    for arm in options.arms:
        if arm in OFF_POLICY_ARMS:
            row, verified = OFF_POLICY_ARMS[arm]
            seed_curves[row] = [run_off_policy(options.epochs, options.eval_every, seed, CONFIG, None, options.overrides,
                                               ROOT / "runs" / f"bench-{options.name}-{arm}-seed{seed}", verified=verified)
                                for seed in options.seeds]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
              "epochs": options.epochs, "eval_every": options.eval_every, "seeds": options.seeds, "baselines": found,
              "arms": options.arms, "overrides": options.overrides, "name": options.name,
              "max_new_tokens": config_lib.load(ROOT / CONFIG, options.overrides).eval.max_new_tokens,
              "curves": {name: mean_curve(curves) for name, curves in seed_curves.items()}, "seed_curves": seed_curves}
    save_results(RESULTS, options.name, result, markdown(result))


if __name__ == "__main__":
    main()
