"""score: the teacher's logprob of every completion token the student sampled.

    kd score --run toy --epoch 3

q_t = log p_teacher(y_t | x, y_<t) at temperature 1, one prefill per sequence; with score.top_k = K
also the teacher's K most likely tokens and their logprobs at every completion position (the
support of train's top-k divergences). The teacher reads the prompt in its own format: a chat prompt
rendered by the teacher's chat template (score.chat_template_kwargs), then exactly the student's
completion token ids; a plain prompt string as the student's ids. Scoring the teacher on the
student's rendering would bias q_t towards a format the teacher was never trained on
(tinker-cookbook issue #796). Every id the student can emit must be the same token for the teacher;
that is checked before the teacher is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from kd.stages import datasets_io, pipeline, rundir, shards
from kd.stages.config import Config
from kd.stages.engines import Scores
from kd.stages.progress import bar
from kd.stages.schemas import ROLLOUTS, SCORED
from kd.stages.session import Session, using


def teacher_scores(session: Session, table: pa.Table, description: str, top_k: int = 0) -> tuple[list[list[int]], list[Scores]]:
    """The teacher's prompt ids of every row, and its scores of the row's completion after them."""
    engine = session.engine("teacher", session.config.score.engine)
    rendered: dict[str, list[int]] = {}  # the samples of one chat share its rendering
    prompts = []
    for ids, messages in zip(table.column("prompt_token_ids").to_pylist(), table.column("prompt_messages").to_pylist()):
        if messages is not None and messages not in rendered:
            rendered[messages] = session.teacher_prompt_ids(ids, messages)
        prompts.append(ids if messages is None else rendered[messages])
    completions = table.column("completion_token_ids").to_pylist()
    with bar(description, len(prompts), session.progress) as advance:
        return prompts, engine.score(
            [p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts], progress=advance, top_k=top_k
        )


def template_probe(table: pa.Table, session: Session) -> dict | None:
    """The first chat prompt as each model sees it (decoded by its own tokenizer, special tokens
    shown), for a glance at the two formats in the manifest and `kd inspect`; None when every prompt
    is a plain string."""
    for row in table.select(["prompt_messages", "prompt_token_ids", "teacher_prompt_token_ids"]).to_pylist():
        if row["prompt_messages"] is not None:
            return {
                "student": session.tokenizer.decode(row["prompt_token_ids"], skip_special_tokens=False),
                "teacher": session.teacher_tokenizer.decode(row["teacher_prompt_token_ids"], skip_special_tokens=False),
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


def with_teacher(table: pa.Table, prompts: list[list[int]], logprobs: list[np.ndarray]) -> pa.Table:
    column = pa.array([q.astype(np.float32) for q in logprobs], type=pa.list_(pa.float32()))
    prompt_column = pa.array(prompts, type=pa.list_(pa.int32()))
    return table.append_column("teacher_prompt_token_ids", prompt_column).append_column("teacher_logprobs", column)


def with_top_k(table: pa.Table, scores: list[Scores]) -> pa.Table:
    ids = pa.array([s.top_ids.reshape(-1) for s in scores], type=pa.list_(pa.int32()))
    logprobs = pa.array([s.top_logprobs.reshape(-1) for s in scores], type=pa.list_(pa.float32()))
    return table.append_column("teacher_top_ids", ids).append_column("teacher_top_logprobs", logprobs)


def scored_stats(table: pa.Table, wall_seconds: float, top_k: int, session: Session) -> dict:
    teacher = [np.asarray(q) for q in table.column("teacher_logprobs").to_pylist()]
    stats = kl_stats(table.column("sampler_logprobs").to_pylist(), teacher)
    stats["tokens_per_second"] = stats["completion_tokens"] / max(wall_seconds, 1e-9)
    stats["top_k"] = top_k
    # Mean teacher probability mass inside the top-K, over completion positions (None without top-k).
    top = table.column("teacher_top_logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    stats["top_k_mass"] = float(np.exp(top.astype(np.float64)).sum() / stats["completion_tokens"]) if top_k and len(top) else None
    stats["template_probe"] = template_probe(table, session)
    return stats


def run(config: Config, epoch: int, session: Session | None = None, shard: int = 0, num_shards: int = 1) -> Path:
    """Write <epoch>/scored, or shard `shard` of `num_shards` of it (see kd.stages.shards)."""
    out = pipeline.stage_dir(config, epoch, "scored")
    if datasets_io.is_complete(out):
        return out
    source = pipeline.stage_dir(config, epoch, "rollouts")

    def produce(select) -> pa.Table:
        rollouts = datasets_io.read_table(source, ROLLOUTS, f"run `kd generate --epoch {epoch}` first")
        rows = select(len(rollouts))
        rollouts = rollouts.slice(rows.start, rows.stop - rows.start)
        where = f" shard {shard}/{num_shards}" if num_shards > 1 else ""
        prompts, scores = teacher_scores(own, rollouts, f"score epoch {epoch}{where}", config.score.top_k)
        return with_top_k(with_teacher(rollouts, prompts, [s.logprobs for s in scores]), scores)

    stage_config = {"teacher": config.teacher, "score": config.to_dict()["score"]}
    with using(config, session) as own:
        manifest = shards.write(out, SCORED, shard, num_shards, stage_config, [source], produce,
                                lambda table, seconds: scored_stats(table, seconds, config.score.top_k, own))
    if manifest is not None:
        numbers = {k: v for k, v in manifest["stats"].items() if k != "template_probe"}
        rundir.log_metrics(config, {"epoch": epoch, "stage": "score", "wall_seconds": manifest["wall_seconds"], **numbers})
    return out
