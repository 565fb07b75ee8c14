"""eval: the policy of an epoch on held-out prompts: reverse KL to the teacher and task accuracy (pass@1).

    kd eval --run toy --epoch 10

Evaluates the policy that samples at `epoch` (the adapter exported at epoch-1; the base student
at epoch 0), so epoch 0 is the baseline and epoch E (after the last training epoch) the result.
Reverse KL: one sample per prompt at T = 1, scored by the prompt's teacher, mean over tokens of
s_t - q_t. Accuracy: the task verifier's (config `task`) mean reward of the greedy completions of
the prompts that have an `answer`: pass@1 for code (HumanEval) and math; `sampled_accuracy` is the
same for the T = 1 samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from kd.stages import datasets_io, pipeline, rundir
from kd.stages.config import Config
from kd.stages.engines import SamplingParams
from kd.stages.generate import sample_rows
from kd.stages.schemas import EVAL, ROLLOUTS
from kd.stages.score import accuracy, kl_stats, split_stats, teacher_scores, with_reward, with_teacher
from kd.stages.session import Session, using


def evaluate(session: Session, adapter: Path | None, epoch: int) -> tuple[pa.Table, dict]:
    """The eval rows and stats of the policy `adapter` (None: the base student); `epoch` salts the seeds.

    Also used by bench/ to evaluate adapters trained by other tools on exactly the same footing.
    """
    cfg = session.config.eval
    heldout = session.prompts(cfg.prompts, cfg.max_new_tokens, "eval.max_new_tokens")
    if cfg.num_prompts:
        heldout = heldout[: cfg.num_prompts]
    # Seeds are salted with "eval" so held-out samples never repeat the training samples' draws.
    sampled = sample_rows(
        session, heldout, 1, SamplingParams(cfg.max_new_tokens), f"eval-{epoch}", epoch, adapter,
        f"eval epoch {epoch}: sample",
    )
    # Greedy decoding only measures accuracy: prompts without an answer skip it.
    greedy = sample_rows(
        session, [p for p in heldout if p.answer is not None], 1, SamplingParams(cfg.max_new_tokens, greedy=True),
        f"eval-{epoch}", epoch, adapter, f"eval epoch {epoch}: greedy",
    )
    table = pa.Table.from_pylist(sampled + greedy, schema=ROLLOUTS.schema)
    teacher_prompts, scores = teacher_scores(session, table, f"eval epoch {epoch}: score")
    logprobs = [s.logprobs for s in scores]
    decoding = pa.array(["sample"] * len(sampled) + ["greedy"] * len(greedy))
    table = with_reward(with_teacher(table, teacher_prompts, logprobs), session.config.task)
    table = table.append_column("decoding", decoding)
    kl = kl_stats([r["sampler_logprobs"] for r in sampled], logprobs[: len(sampled)])
    rewards = table.column("reward").to_pylist()
    stats = {
        "heldout_reverse_kl": kl["teacher_kl"],
        "heldout_reverse_kl_per_sequence": kl["teacher_kl_per_sequence"],
        "accuracy": accuracy(rewards[len(sampled):]),
        "sampled_accuracy": accuracy(rewards[: len(sampled)]),
        "prompts": len(heldout),
    }
    if len(session.config.teachers) > 1:  # the held-out KL of the samples each teacher scored
        stats["teachers"] = split_stats(table, list(range(len(sampled))))
    return table, stats


def run(config: Config, epoch: int, session: Session | None = None) -> Path:
    out = pipeline.stage_dir(config, epoch, "eval")
    if datasets_io.is_complete(out):
        return out
    datasets_io.fault_point(out, "start")
    with using(config, session) as session:
        started = time.time()
        adapter = rundir.policy_adapter(config, epoch, pipeline.EVAL)
        table, stats = evaluate(session, adapter, epoch)
        write(out, config, table, stats, adapter, started)
        rundir.log_metrics(config, {"epoch": epoch, "stage": pipeline.EVAL.command, "wall_seconds": time.time() - started, **stats})
        return out


def write(out: Path, config: Config, table: pa.Table, stats: dict, adapter: Path | None, started: float) -> None:
    """Write `evaluate`'s rows and stats as the eval dataset `out`, naming `adapter` (a kd adapter
    dataset; None: the base student or an adapter kd did not write) as its input; `started`: time.time()
    when the evaluation began."""
    stage_config = {"seed": config.seed, "student": config.student, "teacher": config.teacher, "eval": config.to_dict()["eval"]}
    datasets_io.write_dataset(out, EVAL, table, stage_config, [adapter] if adapter is not None else [], stats, started)
