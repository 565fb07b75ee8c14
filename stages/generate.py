"""generate: the student samples completions of its own and records each token's logprob.

    kd generate --run toy --epoch 3

Epoch e samples with the adapter exported at epoch e-1-s, s the config's max_staleness (the base
model before epoch 0): policy version e-s, recorded in each row and the manifest.
For each chosen prompt x it draws G completions y ~ pi_e(.|x) at temperature T, top-p p, and
records s_t = log pi_e(y_t | x, y_<t) of the distribution actually sampled from: the behaviour
logprob that the train stage's importance ratio divides by.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from kd.stages import datasets_io, pipeline, prompts as prompts_lib, rundir, shards
from kd.stages.config import Config
from kd.stages.engines import SamplingParams, sample_seed
from kd.stages.progress import bar
from kd.stages.schemas import ROLLOUTS
from kd.stages.session import Session, using


def sample_rows(
    session: Session,
    chosen: list[prompts_lib.Prompt],
    samples_per_prompt: int,
    params: SamplingParams,
    seed_key: str,
    policy_version: int,
    adapter: Path | None,
    description: str,
) -> list[dict]:
    """Rows of the rollouts schema; sample j of prompt p is seeded by (seed, seed_key, p, j) alone."""
    config, tokenizer = session.config, session.tokenizer
    engine = session.engine("student", config.generate.engine)
    wanted = [(p, j) for p in chosen for j in range(samples_per_prompt)]
    seeds = [sample_seed(config.seed, seed_key, p.id, j) for p, j in wanted]
    with bar(description, len(wanted), session.progress) as advance:
        completions = engine.sample([p.token_ids for p, _ in wanted], seeds, params, adapter, progress=advance)
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    return [
        {
            "prompt_id": p.id,
            "sample_index": j,
            "prompt_token_ids": p.token_ids,
            "prompt_messages": p.messages,
            "completion_token_ids": c.token_ids,
            "sampler_logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
            "completion_text": text,
            "policy_version": policy_version,
            "answer": p.answer,
            "teacher": p.teacher,
        }
        for (p, j), c, text in zip(wanted, completions, texts)
    ]


def rollout_stats(table: pa.Table, wall_seconds: float) -> dict:
    completions = table.column("completion_token_ids").to_pylist()
    tokens = sum(map(len, completions))
    return {
        "completion_tokens": tokens,
        "tokens_per_second": tokens / max(wall_seconds, 1e-9),
        "mean_sampler_logprob": sum(map(sum, table.column("sampler_logprobs").to_pylist())) / max(tokens, 1),
        "truncated_fraction": sum(r == "length" for r in table.column("finish_reason").to_pylist()) / max(len(table), 1),
    }


def run(config: Config, epoch: int, session: Session | None = None, shard: int = 0, num_shards: int = 1) -> Path:
    """Write <epoch>/rollouts, or shard `shard` of `num_shards` of it (see kd.stages.shards)."""
    out = pipeline.stage_dir(config, epoch, "rollouts")
    if datasets_io.is_complete(out):
        return out
    cfg = config.generate
    adapter = rundir.policy_adapter(config, epoch)
    version = 0 if adapter is None else int(adapter.parent.name) + 1

    def produce(select) -> pa.Table:
        with using(config, session) as own:
            chosen = prompts_lib.choose(own.prompts(cfg.prompts, cfg.max_new_tokens), cfg.prompts_per_epoch, config.seed, epoch)
            chosen = chosen[select(len(chosen))]
            params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
            where = f" shard {shard}/{num_shards}" if num_shards > 1 else ""
            rows = sample_rows(own, chosen, cfg.samples_per_prompt, params, f"train-{epoch}", version, adapter,
                               f"generate epoch {epoch}{where}")
            return pa.Table.from_pylist(rows, schema=ROLLOUTS.schema)

    stage_config = {"seed": config.seed, "student": config.student, "generate": config.to_dict()["generate"],
                    "max_staleness": config.max_staleness, "policy_version": version,
                    "route_by": config.score.route_by, "teachers": list(config.teachers)}
    manifest = shards.write(out, ROLLOUTS, shard, num_shards, stage_config, [adapter] if adapter else [], produce, rollout_stats)
    if manifest is not None:
        rundir.log_metrics(config, {"epoch": epoch, "stage": pipeline.GENERATE.command, "wall_seconds": manifest["wall_seconds"],
                                     **manifest["stats"]})
    return out
