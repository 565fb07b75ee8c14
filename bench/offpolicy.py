"""On-policy vs off-policy distillation vs none, against the teacher tokens each one costs (toy world).

    python bench/offpolicy.py [--epochs 40] [--eval-every 2] [--seeds 0 1]        (just bench-offpolicy)

- on-policy: `kd loop` with configs/toy.yaml as it was measured (sampled-token objective, constant
  learning rate: bench/toy_before.py, which every run here keeps), and once more with the
  teacher's top-8 reverse KL instead (`score.top_k=8`, `train.kl_coef=0`, `train.topk_reverse_kl=1`),
  and top-8 and the whole vocabulary with the same samples per epoch spread over 256 prompts x 1 sample.
  Teacher tokens: the completion tokens the teacher scores (one prefill each).
- off-policy: the classic baseline. Each epoch the teacher samples completions for the same 64
  prompts x 4 samples that kd's generate would choose (T = 1), and the student's LoRA (same rank,
  alpha, learning rate, warm-up, optimiser batch (BATCH, the same for every method), AdamW) is
  fine-tuned on them with cross-entropy.
  Teacher tokens: the completion tokens the teacher generates.
- none: the student as built.
Every policy is evaluated by `kd.stages.evaluate.evaluate` (256 held-out prompts). Writes
bench/results/offpolicy.json and bench/results/offpolicy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from curves import mean_curve, point_table, save as save_results  # bench/curves.py: run as `python bench/...`, bench/ is on sys.path
from toy_before import pinned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# One optimiser batch for every method: 4 steps per epoch of 256 samples. The first version of this
# benchmark used toy.yaml's 128 (2 steps per epoch); every method was then limited by its number of
# steps more than by its teacher tokens.
BATCH = 64
ON_POLICY = {
    "on-policy, sampled token (kd)": ("bench-offpolicy-onpolicy", []),
    "on-policy, top-8 reverse KL (kd)": (
        "bench-offpolicy-onpolicy-top8", ["score.top_k=8", "train.kl_coef=0", "train.topk_reverse_kl=1"],
    ),
    # The same teacher tokens per epoch spread over 4x the prompts (more diversity per step helped
    # most in bench/topk.py).
    "on-policy, top-8 reverse KL, 256 prompts x 1 sample (kd)": (
        "bench-offpolicy-onpolicy-top8-wide", ["score.top_k=8", "train.kl_coef=0", "train.topk_reverse_kl=1",
                                               "generate.prompts_per_epoch=256", "generate.samples_per_prompt=1"],
    ),
    # The teacher's whole next-token distribution at every position it scores: still one prefill per
    # sequence, so the same teacher tokens.
    "on-policy, full-vocabulary reverse KL, 256 prompts x 1 sample (kd)": (
        "bench-offpolicy-onpolicy-vocab-wide", ["score.top_k=vocabulary", "train.kl_coef=0", "train.topk_reverse_kl=1",
                                                "generate.prompts_per_epoch=256", "generate.samples_per_prompt=1"],
    ),
}


def run_on_policy(run_id: str, overrides: list[str], epochs: int, eval_every: int, seed: int,
                  config_path: str = "configs/toy.yaml", batch: int | None = BATCH) -> list[dict]:
    """One `kd loop` of `config_path` with `overrides` ("vocabulary" in one: the toy's vocabulary size) and
    optimiser batch `batch` (None: the config's); its held-out curve against teacher tokens and the
    loop's stage seconds (evaluations left out)."""
    run_id = f"{run_id}-seed{seed}"
    shutil.rmtree(ROOT / "runs" / run_id, ignore_errors=True)
    command = ["kd", "loop", "--config", str(ROOT / config_path), "--run", run_id, "--set", f"seed={seed}",
               "--set", f"epochs={epochs}", "--set", f"eval.every={eval_every}"]
    if batch is not None:
        command += ["--set", f"train.batch_size={batch}"]
    for override in (*pinned(config_path), *overrides):
        if "vocabulary" in override:
            vocabulary = json.loads((ROOT / "runs" / "toy-world" / "toy.json").read_text())["vocab_size"]
            override = override.replace("vocabulary", str(vocabulary))
        command += ["--set", override]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (ROOT / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    curve = []
    for record in sorted((r for r in records if r["stage"] == "eval"), key=lambda r: r["epoch"]):
        before = [r for r in records if r["epoch"] < record["epoch"]]
        curve.append({
            "epoch": record["epoch"],
            "teacher_tokens": sum(r["completion_tokens"] for r in before if r["stage"] == "score"),
            "train_seconds": sum(r["wall_seconds"] for r in before if r["stage"] in ("generate", "score", "train", "export-lora")),
            "heldout_reverse_kl": record["heldout_reverse_kl"], "accuracy": record["accuracy"],
            "sampled_accuracy": record["sampled_accuracy"],
        })
    return curve


def check_verifiable(config) -> None:
    """SystemExit with a one-line fix when no prompt of config.generate.prompts has an `answer`: SFT on
    the samples the task verifier accepts would then train on nothing."""
    from kd.stages.datasets_io import read_prompt_rows

    path = config.generate.prompts
    rows = read_prompt_rows(path)  # an empty file is left to the prompt loader's own error
    if rows and all(not isinstance(row, dict) or row.get("answer") is None for row in rows):
        raise SystemExit(f"{path}: no prompt has an `answer` for the {config.task} verifier, so SFT on the samples it "
                         "accepts would train on nothing: set generate.prompts to a file whose rows have an `answer`, "
                         "or leave the verified arm out")


def run_off_policy(epochs: int, eval_every: int, seed: int, config_path: str = "configs/toy.yaml",
                   batch: int | None = BATCH, overrides: list[str] = (), keep: Path | None = None,
                   verified: bool = False) -> list[dict]:
    """SFT of the student's LoRA on the teacher's own samples of the prompts kd's generate would
    choose, `epochs` epochs of `config_path`'s generate settings (with `overrides`, as `--set` takes
    them), optimiser batch `batch` (None: the config's batch_size x grad_accum); its held-out curve as
    run_on_policy's. `keep`: a directory (replaced) that also gets each evaluation as a kd run's
    eval dataset, keep/<epoch:04d>/eval, for reading as `kd loop`'s are (bench/answers.py).
    `verified`: SFT only on the samples the config's task verifier scores 1 (rejection-sampling
    fine-tuning, Yuan et al. 2023, arXiv:2308.01825); the teacher tokens still count every sample
    drawn. Each epoch takes train.passes passes over its samples; the lr schedule runs over the steps
    of epochs that keep every sample, an epoch with fewer spreading its steps over its share."""
    import torch

    from kd.stages import config as config_lib, prompts as prompts_lib, tasks
    from kd.stages.engines import SamplingParams
    from kd.stages.evaluate import evaluate, write as write_eval
    from kd.stages.generate import sample_rows
    from kd.stages.session import Session
    from kd.stages.objective import student_logprobs
    from kd.stages.policy import Policy
    from kd.stages.schedule import lr_factor
    from kd.stages.train import Collator

    config = config_lib.load(ROOT / config_path, [f"seed={seed}", *pinned(config_path), *overrides])
    if verified:
        check_verifiable(config)
    cfg, gen = config.train, config.generate
    batch = batch or cfg.batch_size * cfg.grad_accum
    teacher_as_sampler = dataclasses.replace(config, student=config.teacher)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-offpolicy-"))
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
    policy = Policy(config)
    model = policy.load(None).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    collate = Collator(model.config.pad_token_id or 0)
    curve, teacher_tokens, seconds = [], 0, 0.0
    planned = cfg.passes * math.ceil(gen.prompts_per_epoch * gen.samples_per_prompt / batch)
    with Session(config, progress=False) as judge, Session(teacher_as_sampler, progress=False) as teacher:
        for epoch in range(epochs + 1):
            if epoch % eval_every == 0 or epoch == epochs:
                adapter = work / f"epoch-{epoch}"
                model.save_pretrained(adapter)
                evaluated = time.time()
                table, stats = evaluate(judge, adapter, epoch)
                if keep is not None:  # the adapter is not a kd dataset and goes with `work`: no input named
                    write_eval(keep / f"{epoch:04d}" / "eval", config, table, stats, None, evaluated)
                curve.append({"epoch": epoch, "teacher_tokens": teacher_tokens, "train_seconds": seconds,
                              "heldout_reverse_kl": stats["heldout_reverse_kl"], "accuracy": stats["accuracy"],
                              "sampled_accuracy": stats["sampled_accuracy"]})
                print(f"   off-policy{', verified' if verified else ''} {curve[-1]}", flush=True)
            if epoch == epochs:
                break
            started = time.perf_counter()
            chosen = prompts_lib.choose(teacher.prompts(gen.prompts, gen.max_new_tokens), gen.prompts_per_epoch,
                                        config.seed, epoch)
            rows = sample_rows(teacher, chosen, gen.samples_per_prompt, SamplingParams(gen.max_new_tokens, gen.temperature),
                               f"train-{epoch}", epoch, None, f"teacher samples, epoch {epoch}")
            teacher_tokens += sum(len(r["completion_token_ids"]) for r in rows)
            if verified:
                rewards = tasks.rewards(config.task, [r["completion_text"] for r in rows], [r["answer"] for r in rows])
                rows = [r for r, reward in zip(rows, rewards) if reward == 1.0]
                print(f"   verified: epoch {epoch} trains on {len(rows)} of the teacher's {len(rewards)} samples", flush=True)
                if not rows:  # a weak teacher or a hard draw of prompts: say why the curve stands still
                    print(f"   warning: epoch {epoch}: no optimiser step", flush=True)
            examples = [{"input_ids": r["prompt_token_ids"] + r["completion_token_ids"],
                         "prompt_length": len(r["prompt_token_ids"]),
                         # SFT reads only the tokens; the collator wants every per-token field of kd's loss.
                         **{name: [0.0] * len(r["completion_token_ids"]) for name in Collator.PER_TOKEN}}
                        for r in rows if r["completion_token_ids"]]
            starts = [start for _ in range(cfg.passes) for start in range(0, len(examples), batch)]
            for index, start in enumerate(starts):
                inputs = collate(examples[start : start + batch])
                # A verified epoch keeps fewer samples; without this its steps would use up the schedule
                # of the epochs after it (and a cosine would sit at lr 0 for the run's last epochs).
                position = epoch * planned + index * planned // len(starts)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * lr_factor(position, cfg, epochs * planned)
                (-student_logprobs(model, policy.head, inputs)[0].mean()).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            seconds += time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    return curve


def tokens_to_reach(curve: list[dict], kl: float) -> int | None:
    return next((p["teacher_tokens"] for p in curve if p["heldout_reverse_kl"] <= kl), None)


def markdown(result: dict) -> str:
    off = result["curves"]["off-policy (SFT on teacher samples)"]
    target = off[-1]["heldout_reverse_kl"]
    lines = [
        "# On-policy vs off-policy distillation (toy world)",
        "",
        f"{result['date']}, {result['machine']}. `python bench/offpolicy.py --epochs {result['epochs']} "
        f"--eval-every {result['eval_every']} --seeds {' '.join(map(str, result['seeds']))}`; 256 samples per epoch, "
        f"optimiser batch {result['batch']}, LoRA rank 16, lr 1e-3 for every method. Every number is the mean over the "
        f"{len(result['seeds'])} seeds, evaluation by evaluation.",
        "",
        f"No distillation: held-out reverse KL {off[0]['heldout_reverse_kl']:.4f}, accuracy {off[0]['accuracy']:.1%}.",
        "",
        f"| run | final KL | final KL of each seed | final accuracy | teacher tokens "
        f"| teacher tokens to reach off-policy's final KL ({target:.4f}) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, curve in result["curves"].items():
        reach = tokens_to_reach(curve, target)
        share = "not reached" if reach is None else f"{reach:.0f} ({reach / off[-1]['teacher_tokens']:.0%} of off-policy's)"
        each = ", ".join(f"{seed[-1]['heldout_reverse_kl']:.4f}" for seed in result["seed_curves"][name])
        lines.append(f"| {name} | {curve[-1]['heldout_reverse_kl']:.4f} | {each} | {curve[-1]['accuracy']:.1%} "
                     f"| {curve[-1]['teacher_tokens']:.0f} | {share} |")
    lines += ["", *point_table(result["curves"], [
        ("epoch", "epoch", ".0f"), ("teacher tokens", "teacher_tokens", ".0f"), ("training s", "train_seconds", ".1f"),
        ("held-out KL", "heldout_reverse_kl", ".4f"), ("accuracy", "accuracy", ".1%")])]
    return "\n".join(lines) + "\n"


def main() -> None:
    import os
    import platform

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help=(
        "run seeds (prompt choice, samples, LoRA init); the curves reported are their means: one held-out "
        "evaluation moves by a few hundredths of KL from one to the next"))
    options = parser.parse_args()
    if not (ROOT / "runs" / "toy-world" / "toy.json").is_file():
        subprocess.run(["kd", "toy"], cwd=ROOT, check=True)
    seed_curves = {name: [run_on_policy(run_id, overrides, options.epochs, options.eval_every, seed)
                          for seed in options.seeds]
                   for name, (run_id, overrides) in ON_POLICY.items()}
    seed_curves["off-policy (SFT on teacher samples)"] = [run_off_policy(options.epochs, options.eval_every, seed)
                                                          for seed in options.seeds]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
              "epochs": options.epochs, "eval_every": options.eval_every, "batch": BATCH, "seeds": options.seeds,
              "curves": {name: mean_curve(curves) for name, curves in seed_curves.items()}, "seed_curves": seed_curves}
    save_results(RESULTS, "offpolicy", result, markdown(result))


if __name__ == "__main__":
    main()
