"""score: the teacher's logprob of every completion token the student sampled.

    kd score --run toy --epoch 3

q_t = log p_teacher(y_t | x, y_<t) at temperature 1, one prefill per sequence; with score.top_k = K
also the teacher's K most likely tokens and their logprobs at every completion position (the
support of train's top-k divergences). The teacher reads the prompt in its own format: a chat prompt
rendered by the teacher's chat template (score.chat_template_kwargs), then exactly the student's
completion token ids; a plain prompt string as the student's ids. Scoring the teacher on the
student's rendering would bias q_t towards a format the teacher was never trained on
(tinker-cookbook issue #796). Every id the student can emit must be the same token for the teacher,
and the teacher's output head must have a row for each of them; both are checked before the teacher
is loaded. A teacher with more rows than the student (a larger model of the same family: Qwen2.5's
152,064 against 151,936) has its top-k taken over the student's ids, the rest of its mass in the tail
bucket of train's divergences (kd.stages.engines.base); score.top_k is at most the student's rows.

Also, per row:
- reward: the task verifier's reward (config `task`, kd.stages.tasks) of the completion against the
  prompt's `answer` (null without one): train's task reward, and the training samples' accuracy.
- teacher: with several teachers (score.teachers, routed by the prompt field score.route_by), the
  one that scored the row. Each teacher writes its own shards of the dataset: with T teachers and
  N shards each, teacher t's shard i is the dataset's shard t x N + i of T x N (the default
  teacher first), so `kd score --teacher NAME` (one Slurm array per teacher) fills in its part.
- self-check: score.self_check rows of every call are scored again (by score.replica when set) and
  a mean difference above score.self_check_tolerance stops the stage with the numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd.stages import datasets_io, pipeline, reporters, rundir, shards, tasks
from kd.stages.config import Config, teacher_field
from kd.stages.engines import Scores
from kd.stages.errors import KdError
from kd.stages.progress import bar
from kd.stages.schemas import ROLLOUTS, SCORED
from kd.stages.session import Session, using


def teacher_prompts(session: Session, table: pa.Table, teacher: str) -> list[list[int]]:
    """Each row's prompt as `teacher` sees it (the samples of one chat share its rendering)."""
    rendered: dict[str, list[int]] = {}
    prompts = []
    for ids, messages in zip(table.column("prompt_token_ids").to_pylist(), table.column("prompt_messages").to_pylist()):
        if messages is not None and messages not in rendered:
            rendered[messages] = session.teacher_prompt_ids(ids, messages, teacher)
        prompts.append(ids if messages is None else rendered[messages])
    return prompts


def by_teacher(table: pa.Table) -> dict[str, list[int]]:
    """The row indices of each teacher's rows (the `teacher` column), teachers in order of appearance."""
    rows: dict[str, list[int]] = {}
    for index, name in enumerate(table.column("teacher").to_pylist()):
        rows.setdefault(name, []).append(index)
    return rows


def teacher_scores(session: Session, table: pa.Table, description: str, top_k: int = 0) -> tuple[list[list[int]], list[Scores]]:
    """The prompt ids of every row as its teacher (the `teacher` column) sees them, and that teacher's
    scores of the row's completion after them."""
    prompts: list = [None] * len(table)
    scores: list = [None] * len(table)
    with bar(description, len(table), session.progress) as advance:
        for teacher, rows in by_teacher(table).items():
            part = table.take(rows)
            ids = teacher_prompts(session, part, teacher)
            engine = session.engine("teacher", session.config.teachers[teacher].engine, teacher)
            got = engine.score([p + c for p, c in zip(ids, part.column("completion_token_ids").to_pylist())],
                               [len(p) for p in ids], progress=advance, top_k=top_k)
            for i, prompt, score in zip(rows, ids, got):
                prompts[i], scores[i] = prompt, score
    return prompts, scores


def self_check(session: Session, table: pa.Table, prompts: list[list[int]], scores: list[Scores], teacher: str,
               where: str, log: Callable[[dict], None]) -> None:
    """Score score.self_check of `table`'s rows (all of one teacher) again, by the teacher's replica when
    it has one, and compare: `log(numbers)`, then a KdError when the mean |q - q'| per token is above
    score.self_check_tolerance. Nothing when off or nothing to check."""
    cfg, spec = session.config.score, session.config.teachers[teacher]
    rows = [i for i, s in enumerate(scores) if len(s.logprobs)]
    if not cfg.self_check or not rows:
        return
    picked = [rows[int(i)] for i in np.unique(np.linspace(0, len(rows) - 1, min(cfg.self_check, len(rows))).round())]
    completions = table.column("completion_token_ids").to_pylist()
    engine = session.engine("teacher", spec.replica or spec.engine, teacher)
    again = engine.score([prompts[i] + completions[i] for i in picked], [len(prompts[i]) for i in picked])
    gaps = np.concatenate([np.abs(scores[i].logprobs.astype(np.float64) - s.logprobs) for i, s in zip(picked, again)])
    against = (f"its replica ({teacher_field(teacher, 'replica')})" if spec.replica
               else "itself (a second request to the same engine)")
    result = {"teacher": teacher, "against": "replica" if spec.replica else "same engine", "sequences": len(picked),
              "tokens": int(len(gaps)), "mean_abs_diff": float(gaps.mean()), "max_abs_diff": float(gaps.max())}
    log(result)
    if result["mean_abs_diff"] > cfg.self_check_tolerance:
        raise KdError(
            f"{where}: teacher {teacher} disagrees with {against}: mean |q - q'| {result['mean_abs_diff']:.4g} per token "
            f"(max {result['max_abs_diff']:.4g}) over {result['tokens']} tokens of {len(picked)} sequences, above "
            f"score.self_check_tolerance {cfg.self_check_tolerance:g}; check that both serve the same weights, dtype, "
            "quantisation and chat template (or raise the tolerance)"
        )


def template_probe(table: pa.Table, session: Session) -> dict | None:
    """The first chat prompt as each model sees it (decoded by its own tokenizer, special tokens
    shown) and the comparison of their generation prompts (Session.prefix_check: the teacher's
    assistant_prefix against the one that makes its prompt end as the student's), for a glance at the
    two formats in the manifest and `kd inspect`; None when every prompt is a plain string."""
    for row in table.select(["prompt_messages", "prompt_token_ids", "teacher_prompt_token_ids", "teacher"]).to_pylist():
        if row["prompt_messages"] is not None:
            return {
                "student": session.tokenizer.decode(row["prompt_token_ids"], skip_special_tokens=False),
                "teacher": session.teacher_tokenizer(row["teacher"]).decode(row["teacher_prompt_token_ids"],
                                                                             skip_special_tokens=False),
                "prefix_check": session.prefix_check(row["prompt_messages"], row["teacher"]),
            }
    return None


def kl_stats(sampler: list[list[float]], teacher: list[np.ndarray]) -> dict:
    """Per-token reverse KL estimate mean(s_t - q_t), and per sequence (summed over tokens)."""
    diffs = [np.asarray(s, dtype=np.float64) - q for s, q in zip(sampler, teacher)]
    tokens = sum(len(d) for d in diffs)
    return {
        "teacher_kl": float(sum(d.sum() for d in diffs) / max(tokens, 1)),
        "teacher_kl_per_sequence": float(np.mean([d.sum() for d in diffs])) if diffs else 0.0,
        "completion_tokens": tokens,
    }


def accuracy(rewards: list[float | None]) -> float | None:
    """Mean reward of the rows that have one (the verifier's accuracy, pass@1 for code); None if none has."""
    checked = [r for r in rewards if r is not None]
    return sum(checked) / len(checked) if checked else None


def with_teacher(table: pa.Table, prompts: list[list[int]], logprobs: list[np.ndarray]) -> pa.Table:
    column = pa.array([q.astype(np.float32) for q in logprobs], type=pa.list_(pa.float32()))
    prompt_column = pa.array(prompts, type=pa.list_(pa.int32()))
    return table.append_column("teacher_prompt_token_ids", prompt_column).append_column("teacher_logprobs", column)


def with_reward(table: pa.Table, task: str) -> pa.Table:
    """`table` with the `task` verifier's reward of each row's completion (kd.stages.tasks)."""
    rewards = tasks.rewards(task, table.column("completion_text").to_pylist(), table.column("answer").to_pylist())
    return table.append_column("reward", pa.array(rewards, type=pa.float32()))


def split_stats(table: pa.Table, rows: list[int] | None = None) -> dict:
    """Rows, reverse KL per token and accuracy of each teacher's rows among `rows` (default: all)."""
    wanted = set(range(len(table)) if rows is None else rows)
    sampler, teacher = table.column("sampler_logprobs").to_pylist(), table.column("teacher_logprobs").to_pylist()
    rewards = table.column("reward").to_pylist()
    split = {}
    for name, mine in by_teacher(table).items():
        mine = [i for i in mine if i in wanted]
        kl = kl_stats([sampler[i] for i in mine], [np.asarray(teacher[i]) for i in mine])["teacher_kl"]
        split[name] = {"rows": len(mine), "teacher_kl": kl, "accuracy": accuracy([rewards[i] for i in mine])}
    return split


def with_top_k(table: pa.Table, scores: list[Scores]) -> pa.Table:
    ids = pa.array([s.top_ids.reshape(-1) for s in scores], type=pa.list_(pa.int32()))
    logprobs = pa.array([s.top_logprobs.reshape(-1) for s in scores], type=pa.list_(pa.float32()))
    return table.append_column("teacher_top_ids", ids).append_column("teacher_top_logprobs", logprobs)


def scored_stats(table: pa.Table, wall_seconds: float, top_k: int, session: Session) -> dict:
    teacher = [np.asarray(q) for q in table.column("teacher_logprobs").to_pylist()]
    sampler = table.column("sampler_logprobs").to_pylist()
    stats = kl_stats(sampler, teacher)
    stats["tokens_per_second"] = stats["completion_tokens"] / max(wall_seconds, 1e-9)
    stats["accuracy"] = accuracy(table.column("reward").to_pylist())
    stats["teachers"] = split_stats(table)
    stats["top_k"] = top_k
    # Mean teacher probability mass inside the top-K, over completion positions (None without top-k).
    top = table.column("teacher_top_logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    stats["top_k_mass"] = float(np.exp(top.astype(np.float64)).sum() / stats["completion_tokens"]) if top_k and len(top) else None
    stats["template_probe"] = template_probe(table, session)
    return stats


def run(config: Config, epoch: int, session: Session | None = None, shard: int = 0, num_shards: int = 1,
        teacher: str | None = None) -> Path:
    """Write <epoch>/scored, or shard `shard` of `num_shards` of it (see kd.stages.shards), of every
    teacher's rows or, with `teacher`, of that teacher's only."""
    out = pipeline.stage_dir(config, epoch, "scored")
    names = list(config.teachers)
    if teacher is not None and teacher not in names:
        raise KdError(f"--teacher {teacher}: this run has no such teacher; its teachers are {', '.join(names)}")
    if datasets_io.is_complete(out):
        return out
    source = pipeline.stage_dir(config, epoch, "rollouts")
    # Read (and verified) once however many teachers this call scores.
    rollouts = functools.cache(lambda: datasets_io.read_table(source, ROLLOUTS, f"run `kd generate --epoch {epoch}` first"))

    def produce_for(name: str):
        def produce(_dataset_share) -> pa.Table:
            # This teacher's share of its own rows: the dataset-wide share would cut across teachers.
            mine = rollouts().filter(pc.equal(rollouts().column("teacher"), name))
            rows = shards.block(len(mine), shard, num_shards)
            mine = mine.slice(rows.start, rows.stop - rows.start)
            where = f"score epoch {epoch}" + (f" teacher {name}" if len(names) > 1 else "") + (
                f" shard {shard}/{num_shards}" if num_shards > 1 else "")
            prompts, scores = teacher_scores(own, mine, where, config.score.top_k)
            self_check(own, mine, prompts, scores, name, where, lambda numbers: rundir.log_metrics(
                config, {"epoch": epoch, "stage": reporters.SELF_CHECK, "shard": shard, **numbers}))
            return with_top_k(with_reward(with_teacher(mine, prompts, [s.logprobs for s in scores]), config.task), scores)

        return produce

    stage_config = {"teacher": config.teacher, "task": config.task, "score": config.to_dict()["score"]}
    manifest = None
    with using(config, session) as own:
        for name in [teacher] if teacher else names:
            position = names.index(name) * num_shards + shard
            manifest = shards.write(out, SCORED, position, len(names) * num_shards, stage_config, [source], produce_for(name),
                                    lambda table, seconds: scored_stats(table, seconds, config.score.top_k, own))
            if manifest is not None:
                break
    if manifest is not None:
        numbers = {k: v for k, v in manifest["stats"].items() if k not in ("template_probe", "teachers")}
        rundir.log_metrics(config, {"epoch": epoch, "stage": pipeline.SCORE.command, "wall_seconds": manifest["wall_seconds"], **numbers})
    return out
