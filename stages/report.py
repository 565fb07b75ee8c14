"""report: PNG plots and a Markdown summary of a run, written into runs/<id>/report/.

    kd report runs/toy          (kd loop writes it after the last epoch)

Reads only what the stages logged in metrics.jsonl, so it works on a finished run, a run cut short
and a run still going. Plots: teacher KL of each epoch's samples and held-out reverse KL; held-out
greedy accuracy (and the accuracy of the training samples); importance ratios, and the
sampler/trainer mismatch, per optimiser step; tokens/s per stage. The directory is replaced as a whole (written
aside, then renamed), so a reader never sees half a report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kd.stages import datasets_io, pipeline, reporters, rundir
from kd.stages.errors import KdError

EVAL, SCORE, STEP = pipeline.EVAL.command, pipeline.SCORE.command, reporters.TRAIN_STEP

FIGURES = {
    "kl.png": "teacher KL (training samples) and held-out reverse KL per epoch",
    "accuracy.png": "held-out greedy accuracy and training-sample accuracy per epoch",
    "ratios.png": "importance ratio (mean, max) per optimiser step",
    "mismatch.png": "sampler/trainer logprob mismatch per optimiser step",
    "throughput.png": "tokens/s of generate, score and train per epoch",
}


def series(records: list[dict], stage: str, field: str, x: str = "epoch") -> tuple[list, list]:
    points = sorted((r[x], r[field]) for r in records if r.get("stage") == stage and r.get(field) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def line_plot(path: Path, title: str, xlabel: str, lines: list[tuple[str, tuple[list, list], str]],
          log_scale: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, (xs, ys), style in lines:
        if xs:
            axis.plot(xs, ys, style, label=label)
    if log_scale:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_markdown(run_dir: Path, records: list[dict]) -> str:
    evals = sorted((r for r in records if r.get("stage") == EVAL), key=lambda r: r["epoch"])
    lines = [f"# Run {run_dir.name}", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += [
            f"Held-out reverse KL per token {first['heldout_reverse_kl']:.4f} after {first['epoch']} epochs -> "
            f"{last['heldout_reverse_kl']:.4f} after {last['epoch']}.",
            "",
            "| epochs trained | held-out reverse KL / token | held-out accuracy |",
            "|---|---|---|",
        ]
        for r in evals:
            accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
            lines.append(f"| {r['epoch']} | {r['heldout_reverse_kl']:.4f} | {accuracy} |")
    seconds: dict[str, list[float]] = {}
    for r in records:
        if "wall_seconds" in r:
            seconds.setdefault(r["stage"], []).append(r["wall_seconds"])
    lines += ["", "| stage | calls | mean s | total s |", "|---|---|---|---|"]
    lines += [f"| {stage} | {len(v)} | {sum(v) / len(v):.2f} | {sum(v):.1f} |" for stage, v in seconds.items()]
    lines += [""] + [f"![{about}]({name})" for name, about in FIGURES.items()]
    return "\n".join(lines) + "\n"


def run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    records = rundir.read_metrics(run_dir)
    if not records:
        raise KdError(f"{run_dir}: no metrics.jsonl to report on; run `kd loop` (or the stages) first")
    out, staging = run_dir / "report", run_dir / ".report.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        line_plot(staging / "kl.png", "reverse KL per token", "epoch", [
            ("teacher KL of the epoch's samples (score)", series(records, SCORE, "teacher_kl"), "-"),
            ("held-out reverse KL (eval)", series(records, EVAL, "heldout_reverse_kl"), "o-"),
        ])
        line_plot(staging / "accuracy.png", "task accuracy", "epoch", [
            ("held-out, greedy (eval)", series(records, EVAL, "accuracy"), "o-"),
            ("training samples (score)", series(records, SCORE, "accuracy"), "-"),
        ])
        line_plot(staging / "ratios.png", "importance ratio pi_theta / pi_old, off-policy weight pi_old / sampler",
                  "optimiser step", [
            ("ratio mean", series(records, STEP, "ratio_mean", "global_step"), "-"),
            ("ratio max", series(records, STEP, "ratio_max", "global_step"), "-"),
            ("weight p99", series(records, STEP, "is_weight_p99", "global_step"), "-"),
            ("weight max", series(records, STEP, "is_weight_max", "global_step"), "-"),
        ], log_scale=True)  # one large ratio would flatten the rest
        line_plot(staging / "mismatch.png", "mean |sampler - trainer| logprob per token", "optimiser step", [
            ("mismatch", series(records, STEP, "mismatch", "global_step"), "-"),
        ])
        line_plot(staging / "throughput.png", "tokens per second", "epoch", [
            (stage.command, series(records, stage.command, "tokens_per_second"), "-")
            for stage in (pipeline.GENERATE, pipeline.SCORE, pipeline.TRAIN)
        ])
        (staging / "report.md").write_text(summary_markdown(run_dir, records))
        datasets_io.fault_point(out, "staged")  # a process sent SIGTERM publishes nothing (datasets_io.TERMINATED)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
