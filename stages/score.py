"""score: the teacher's logprob of every completion token the student sampled.

    kd score --run toy --epoch 3

q_t = log p_teacher(y_t | x, y_<t) at temperature 1, one prefill per sequence; with score.top_k = K
also the teacher's K most likely tokens and their logprobs at every completion position (the
support of train's top-k divergences). The teacher must
tokenize exactly like the student (same vocabulary and chat template), or q_t scores different
text than the student wrote; that is checked before the teacher is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kd.stages import datasets_io, run as run_lib
from kd.stages.config import Config
from kd.stages.engines import Scores
from kd.stages.progress import bar
from kd.stages.schemas import ROLLOUTS, SCORED
from kd.stages.session import Session, using


def teacher_scores(session: Session, table: pa.Table, description: str, top_k: int = 0) -> list[Scores]:
    engine = session.engine("teacher", session.config.score.engine)
    prompts = table.column("prompt_token_ids").to_pylist()
    completions = table.column("completion_token_ids").to_pylist()
    with bar(description, len(prompts), session.progress) as advance:
        return engine.score(
            [p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts], progress=advance, top_k=top_k
        )


def kl_stats(sampler: list[list[float]], teacher: list[np.ndarray]) -> dict:
    """Per-token reverse KL estimate mean(s_t - q_t), and per sequence (summed over tokens)."""
    diffs = [np.asarray(s, dtype=np.float64) - q for s, q in zip(sampler, teacher)]
    tokens = sum(len(d) for d in diffs)
    return {
        "teacher_kl": float(sum(d.sum() for d in diffs) / max(tokens, 1)),
        "teacher_kl_per_sequence": float(np.mean([d.sum() for d in diffs])) if diffs else 0.0,
        "completion_tokens": tokens,
    }


def with_teacher(table: pa.Table, logprobs: list[np.ndarray]) -> pa.Table:
    column = pa.array([q.astype(np.float32) for q in logprobs], type=pa.list_(pa.float32()))
    return table.append_column("teacher_logprobs", column)


def with_top_k(table: pa.Table, scores: list[Scores]) -> pa.Table:
    ids = pa.array([s.top_ids.reshape(-1) for s in scores], type=pa.list_(pa.int32()))
    logprobs = pa.array([s.top_logprobs.reshape(-1) for s in scores], type=pa.list_(pa.float32()))
    return table.append_column("teacher_top_ids", ids).append_column("teacher_top_logprobs", logprobs)


def top_k_mass(scores: list[Scores]) -> float | None:
    """Mean teacher probability mass inside the top-K, over completion positions (None without top-k)."""
    masses = [np.exp(s.top_logprobs.astype(np.float64)).sum(-1) for s in scores if s.top_logprobs.size]
    return float(np.concatenate(masses).mean()) if masses else None


def run(config: Config, epoch: int, session: Session | None = None) -> Path:
    out = run_lib.stage_dir(config, epoch, "scored")
    if datasets_io.is_complete(out):
        return out
    datasets_io.fault_point(out, "start")
    with using(config, session) as session:
        started = time.time()
        source = run_lib.stage_dir(config, epoch, "rollouts")
        rollouts = datasets_io.read_table(source, ROLLOUTS, f"run `kd generate --epoch {epoch}` first")
        scores = teacher_scores(session, rollouts, f"score epoch {epoch}", config.score.top_k)
        logprobs = [s.logprobs for s in scores]
        stats = kl_stats(rollouts.column("sampler_logprobs").to_pylist(), logprobs)
        stats["tokens_per_second"] = stats["completion_tokens"] / max(time.time() - started, 1e-9)
        stats["top_k"] = config.score.top_k
        stats["top_k_mass"] = top_k_mass(scores)
        stage_config = {"teacher": config.teacher, "score": config.to_dict()["score"]}
        table = with_top_k(with_teacher(rollouts, logprobs), scores)
        datasets_io.write_dataset(out, SCORED, table, stage_config, [source], stats, started)
        run_lib.log_metrics(config, {"epoch": epoch, "stage": "score", "wall_seconds": time.time() - started, **stats})
        return out
