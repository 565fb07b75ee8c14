"""inspect: a polars summary of any stage directory: rows, tokens, mean KL, the task reward (scored,
eval), each teacher's rows, KL and reward (several teachers), the teacher's top-K and the mass it
covers (scored with score.top_k), the first chat prompt as the student and the teacher each saw it
(scored), decoded samples.

    kd inspect runs/toy/0003/scored
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from kd.stages import datasets_io
from kd.stages.errors import KdError
from kd.stages.progress import console
from kd.stages.session import prefix_advice


def run(path: Path, samples: int = 3) -> dict:
    manifest = datasets_io.read_manifest(path)
    if manifest is None and (unfinished := datasets_io.missing_message(Path(path), Path(path).name)):
        raise KdError(unfinished)
    kind = datasets_io.kind_of(path)
    console.print(f"[bold]{path}[/]: {kind.name} v{manifest['schema_version']}, {manifest['rows']} rows, "
                  f"{sum(f['bytes'] for f in manifest['files'])} bytes in {len(manifest['files'])} files, "
                  f"written in {manifest['wall_seconds']}s by kd {manifest['kd_version']}")
    summary: dict = {"kind": kind.name, "rows": manifest["rows"]}
    if kind.schema is None:
        console.print(manifest["stats"])
        return summary
    frame = pl.scan_ipc(str(Path(path) / "*.arrow"))
    if "completion_token_ids" in kind.schema.names:
        lengths = pl.col("completion_token_ids").list.len()
        exprs = [pl.len().alias("rows"), lengths.sum().alias("completion_tokens"), lengths.mean().alias("mean_length"),
                 (pl.col("finish_reason") == "length").mean().alias("truncated")]
        if "teacher_logprobs" in kind.schema.names:
            kl = (pl.col("sampler_logprobs").list.sum() - pl.col("teacher_logprobs").list.sum()).sum() / lengths.sum()
            exprs += [kl.alias("mean_kl_per_token"), pl.col("reward").mean().alias("mean_reward")]
        stats = frame.select(exprs).collect()
        console.print(stats)
        summary.update(stats.row(0, named=True))
        split = frame.group_by("teacher", maintain_order=True).agg(exprs).collect()
        if split.height > 1:
            console.print("per teacher:")
            console.print(split)
            summary["teachers"] = {row["teacher"]: row for row in split.iter_rows(named=True)}
        if manifest["stats"].get("top_k"):
            summary.update(top_k=manifest["stats"]["top_k"], top_k_mass=manifest["stats"]["top_k_mass"])
            console.print(f"teacher top-k: K = {summary['top_k']}, mean teacher mass inside the top-K "
                          f"{summary['top_k_mass']:.4f}")
        if probe := manifest["stats"].get("template_probe"):
            summary["template_probe"] = probe
            console.print("the first chat prompt as each model sees it:", markup=False)
            for role in ("student", "teacher"):
                console.print(f"  {role}: {probe[role]!r}", markup=False)
            if (advice := prefix_advice(probe.get("prefix_check"))) is not None:
                console.print(f"  warning: {advice}", markup=False)
        rewarded = "reward" in kind.schema.names
        shown = frame.select("prompt_id", "sample_index", "teacher", "completion_text",
                             *(["reward"] if rewarded else [])).head(samples).collect()
        for row in shown.iter_rows(named=True):
            reward = f" reward={row['reward']}" if rewarded else ""
            console.print(f"  {row['prompt_id']}#{row['sample_index']} teacher={row['teacher']}{reward}: "
                          f"{row['completion_text']!r}", markup=False)
    else:
        table = frame.collect()
        console.print(table)
        summary["steps"] = table.height
    return summary
