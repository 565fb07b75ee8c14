"""Top-k distillation against sampled-token distillation and TRL's DistillationTrainer, on the toy world.

    python bench/topk.py [--epochs 40] [--eval-every 5]        (just bench-topk)

Runs, one after another on this machine:
- `kd loop` with the sampled-token objective (K = 1), and with the top-k reverse KL alone
  (train.kl_coef 0, train.topk_reverse_kl 1) for K = 8, 32 and the whole vocabulary, at 64 samples
  per optimiser step like TRL below (and K = 8 once more at toy.yaml's 128, and the whole
  vocabulary once more with one sample for each of 256 prompts per epoch, as TRL samples, and with
  512 prompts per epoch for half the epochs: the same optimiser steps);
- `trl.DistillationTrainer` (beta = 1: reverse KL over the full vocabulary, on-policy generation with
  transformers), same student, teacher, LoRA, learning rate and warm-up, for the wall time of the
  slowest kd run.
Every policy is evaluated by the same code (`kd.stages.evaluate.evaluate`: held-out reverse KL from one
sample per held-out prompt, greedy accuracy); evaluation time is excluded from the training wall time.
Writes bench/results/topk.json and bench/results/topk.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from curves import save as save_results  # bench/curves.py: run as `python bench/...`, bench/ is on sys.path
from toy_before import pinned

from kd.stages import pipeline

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TRAINING_STAGES = {stage.command for stage in pipeline.EPOCH}
TOY = ROOT / "configs" / "toy.yaml"


def kd_variants(vocabulary: int, epochs: int) -> dict[str, list[str]]:
    """Batch 64 samples per optimiser step, as TRL's 64 prompts per step; one line with toy.yaml's 128.
    Each on toy.yaml as it was measured (bench/toy_before.py)."""
    top_k = ["train.kl_coef=0", "train.topk_reverse_kl=1"]
    batch = ["train.batch_size=64"]
    variants = {
        "kd K=1 (sampled token)": batch,
        "kd K=8 reverse KL": ["score.top_k=8", *top_k, *batch],
        "kd K=32 reverse KL": ["score.top_k=32", *top_k, *batch],
        f"kd K={vocabulary} (vocabulary) reverse KL": [f"score.top_k={vocabulary}", *top_k, *batch],
        "kd K=8 reverse KL, batch 128 (toy.yaml)": ["score.top_k=8", *top_k],
        # TRL samples one completion for each of 64 prompts per step; kd's default is 4 for each of 16.
        f"kd K={vocabulary} reverse KL, 1 sample x 256 prompts": [
            f"score.top_k={vocabulary}", *top_k, *batch, "generate.prompts_per_epoch=256", "generate.samples_per_prompt=1",
        ],
        # Twice the samples per epoch for half the epochs: the same optimiser steps, half the per-epoch
        # costs (stage starts, checkpoints); a sample is at most 7 steps stale instead of 3.
        f"kd K={vocabulary} reverse KL, 1 sample x 512 prompts, 8 steps per epoch": [
            f"score.top_k={vocabulary}", *top_k, *batch, "generate.prompts_per_epoch=512", "generate.samples_per_prompt=1",
            f"epochs={epochs // 2}",
        ],
    }
    return {name: [*pinned(TOY), *overrides] for name, overrides in variants.items()}


def kd_run_id(name: str, prefix: str = "bench-topk-") -> str:
    return prefix + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_kd(name: str, overrides: list[str], epochs: int, eval_every: int, prefix: str = "bench-topk-",
           config: Path = TOY, every_epoch: bool = False) -> list[dict]:
    """`kd loop` as a user runs it; the curve: held-out KL and accuracy against cumulative training seconds,
    at each evaluated epoch, or with `every_epoch` at every epoch (KL and accuracy None where the loop
    did not evaluate: the caller evaluates the adapters afterwards)."""
    run_id = kd_run_id(name, prefix)
    shutil.rmtree(ROOT / "runs" / run_id, ignore_errors=True)  # a fresh run: `kd loop` would resume an old one
    command = ["kd", "loop", "--config", str(config), "--run", run_id,
               "--set", f"epochs={epochs}", "--set", f"eval.every={eval_every}"]
    for override in overrides:
        command += ["--set", override]
    print(f"== {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (ROOT / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    evals = {record["epoch"]: record for record in records if record.get("stage") == "eval"}
    return [{"epoch": epoch,
             "train_seconds": sum(r["wall_seconds"] for r in records if r.get("stage") in TRAINING_STAGES and r["epoch"] < epoch),
             "heldout_reverse_kl": evals.get(epoch, {}).get("heldout_reverse_kl"), "accuracy": evals.get(epoch, {}).get("accuracy")}
            for epoch in (range(epochs + 1) if every_epoch else sorted(evals))]


TRL_DISTILLATION = "trl DistillationTrainer (beta=1)"
TRL_MINILLM = "trl experimental MiniLLMTrainer (Tinker-like: per-token reverse KL advantage)"


def run_trl(budget_seconds: float, eval_every: int, trainer_name: str = TRL_DISTILLATION, seed: int = 0,
            adapters: Path | None = None, config_path: Path = TOY, batch: tuple[int, int] | None = None,
            evaluate_during: bool = True) -> list[dict]:
    """A TRL distiller with the hyper-parameters of kd's `config_path`, stopped after `budget_seconds`
    of training: `trl.DistillationTrainer` (beta 1; one completion per prompt, `batch` = (prompts per
    micro-batch, micro-batches per optimiser step), by default generate.prompts_per_epoch prompts in
    one), or `trl.experimental.minillm.MiniLLMTrainer` (TRL 0.2x only: TRL 1.x has no MiniLLM) set
    up as the Tinker objective: advantage = per-token reverse KL to the teacher, no single-step
    decomposition, no discount, no task reward, 64 completions per step (16 prompts x 4, as kd
    samples on the toy). The adapter of each checkpoint (every `eval_every` steps and the last) is
    kept as `adapters`/step-N when `adapters` is given; with `evaluate_during` False a checkpoint is
    only saved, and its point has no KL or accuracy (the caller evaluates the adapters afterwards).
    TRL's learning rate follows kd's schedule (kd.stages.schedule.lr_factor), not transformers' warm-up,
    which starts at 0."""
    import datasets
    from peft import LoraConfig
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from kd.stages import config as config_lib
    from kd.stages.datasets_io import read_prompt_rows
    from kd.stages.evaluate import evaluate
    from kd.stages.schedule import lr_factor
    from kd.stages.session import Session

    if not (evaluate_during or adapters):
        raise ValueError("run_trl: with evaluate_during=False the checkpoints must be kept: pass adapters")
    config = config_lib.load(config_path, [f"seed={seed}", *pinned(config_path)])
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, num_prompts=0))
    cfg = config.train
    if cfg.lr_scheduler != "constant":
        # TRL stops on the clock, so the run has no length to decay over as kd's epochs do.
        raise ValueError(f"run_trl: {config_path}: train.lr_scheduler {cfg.lr_scheduler!r}; only 'constant' compares")
    session = Session(config, progress=False)
    rows = read_prompt_rows(config.generate.prompts)
    train_set = datasets.Dataset.from_list([{"prompt": row["messages"]} for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-trl-"))
    curve: list[dict] = []

    class EvalAndBudget(TrainerCallback):
        """Checkpoints (and evaluates) every `eval_every` steps with the clock stopped; stops training when the
        budget is spent."""

        def __init__(self):
            self.started = self.paused = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.record(0, None)

        def record(self, step: int, model) -> None:
            pause = time.perf_counter()
            adapter = None
            if model is not None:
                adapter = (adapters or work) / f"step-{step}"
                model.save_pretrained(adapter)
            stats = evaluate(session, adapter, step)[1] if evaluate_during else {}
            curve.append({"step": step, "train_seconds": pause - self.started - self.paused,
                          "heldout_reverse_kl": stats.get("heldout_reverse_kl"), "accuracy": stats.get("accuracy")})
            print(f"   trl step {step}: {curve[-1]}", flush=True)
            self.paused += time.perf_counter() - pause

        def on_step_end(self, args, state, control, model=None, **kwargs):
            spent = time.perf_counter() - self.started - self.paused
            if state.global_step % eval_every == 0 or spent >= budget_seconds:
                self.record(state.global_step, model)
            if spent >= budget_seconds:
                control.should_training_stop = True

    micro_batch, grad_accum = batch or (config.generate.prompts_per_epoch, 1)
    common = dict(
        output_dir=str(work / "trainer"), learning_rate=cfg.learning_rate, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        max_completion_length=config.generate.max_new_tokens, temperature=config.generate.temperature,
        max_grad_norm=cfg.max_grad_norm, max_steps=100000, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=True, seed=config.seed, bf16=False, disable_tqdm=True,
    )
    if trainer_name == TRL_MINILLM:
        from trl.experimental.minillm import MiniLLMConfig as TrainerConfig, MiniLLMTrainer as Trainer

        args = TrainerConfig(**common, num_generations=config.generate.samples_per_prompt, beta=0.0,
                             rkl_advantage=True, single_step_decomposition=False, gamma=0.0,
                             length_normalization=False, kd_temperature=1.0)
    else:
        from trl import DistillationConfig as TrainerConfig, DistillationTrainer as Trainer

        args = TrainerConfig(**common, beta=1.0)

    class KdSchedule(Trainer):
        """TRL's trainer with kd's warm-up: transformers' constant_with_warmup starts at rate 0."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda step: lr_factor(step, cfg, 0))
            return self.lr_scheduler

    trainer = KdSchedule(
        model=AutoModelForCausalLM.from_pretrained(config.student, dtype="float32"),
        teacher_model=AutoModelForCausalLM.from_pretrained(config.teacher, dtype="float32"),
        args=args, train_dataset=train_set, processing_class=tokenizer,
        peft_config=LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"),
        callbacks=[EvalAndBudget()],
    )
    with session:  # closes the evaluation engines even when training fails
        trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    return curve


def at_time(curve: list[dict], seconds: float) -> dict:
    """The last evaluation at or before `seconds` of training."""
    return [point for point in curve if point["train_seconds"] <= seconds + 1e-9][-1]


def first_reaching(curve: list[dict], kl: float) -> float | None:
    return next((point["train_seconds"] for point in curve if point["heldout_reverse_kl"] <= kl), None)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl")}


def markdown(result: dict) -> str:
    common = result["common_seconds"]
    trl_final = result["curves"][TRL_DISTILLATION][-1]["heldout_reverse_kl"]
    lines = [
        "# Top-k distillation vs sampled-token vs TRL (toy world)",
        "",
        f"{result['date']}, {result['machine']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.",
        f"`python bench/topk.py --epochs {result['epochs']} --eval-every {result['eval_every']}`; training seconds exclude "
        "evaluation; every policy evaluated by `kd.stages.evaluate.evaluate` on the 256 held-out prompts.",
        "",
        f"| run | epochs / steps | training s | final held-out KL | final accuracy | KL at {common:.0f} s "
        f"| accuracy at {common:.0f} s | s to reach TRL's final KL ({trl_final:.4f}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, curve in result["curves"].items():
        final, common_point = curve[-1], at_time(curve, common)
        reach = first_reaching(curve, trl_final)
        lines.append(
            f"| {name} | {final.get('epoch', final.get('step'))} | {final['train_seconds']:.1f} "
            f"| {final['heldout_reverse_kl']:.4f} | {final['accuracy']:.1%} | {common_point['heldout_reverse_kl']:.4f} "
            f"| {common_point['accuracy']:.1%} | {'not reached' if reach is None else f'{reach:.1f}'} |"
        )
    lines += ["", "Curves (training seconds: held-out KL / accuracy):", ""]
    for name, curve in result["curves"].items():
        points = ", ".join(f"{p['train_seconds']:.0f}s: {p['heldout_reverse_kl']:.3f}/{p['accuracy']:.0%}" for p in curve)
        lines.append(f"- {name}: {points}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--trl-eval-every", type=int, default=10, help="TRL optimiser steps between evaluations")
    parser.add_argument("--minillm", action="store_true", help=(
        "Only run TRL's experimental MiniLLMTrainer and add it to the existing bench/results/topk.json "
        "(needs TRL 0.2x, which has it: `just bench-minillm` makes that environment)"))
    options = parser.parse_args()
    if not (ROOT / "runs" / "toy-world" / "toy.json").is_file():
        subprocess.run(["kd", "toy"], cwd=ROOT, check=True)
    if options.minillm:
        result = json.loads((RESULTS / "topk.json").read_text())
        curves = result["curves"]
        budget = max(curve[-1]["train_seconds"] for name, curve in curves.items() if name.startswith("kd "))
        print(f"== {TRL_MINILLM}, {budget:.0f} s of training", flush=True)
        curves[TRL_MINILLM] = run_trl(budget, options.trl_eval_every, TRL_MINILLM)
        result["versions"]["trl (MiniLLM run)"] = versions()["trl"]
    else:
        vocabulary = json.loads((ROOT / "runs" / "toy-world" / "toy.json").read_text())["vocab_size"]
        curves = {name: run_kd(name, overrides, options.epochs, options.eval_every)
                  for name, overrides in kd_variants(vocabulary, options.epochs).items()}
        budget = max(curve[-1]["train_seconds"] for curve in curves.values())
        print(f"== trl DistillationTrainer, {budget:.0f} s of training", flush=True)
        curves[TRL_DISTILLATION] = run_trl(budget, options.trl_eval_every)
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{__import__('os').cpu_count()} cores, CPU only", "versions": versions(), "epochs": options.epochs,
            "eval_every": options.eval_every, "curves": curves,
        }
    result["common_seconds"] = min(curve[-1]["train_seconds"] for curve in curves.values())
    save_results(RESULTS, "topk", result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
