"""PNG curves of the quality benchmarks: held-out reverse KL and accuracy against each x axis the
benchmark recorded (teacher tokens, training wall seconds).

    python bench/curves.py                     # every bench/results/*.json that has curves
    python bench/curves.py bench/results/offpolicy.json

bench/offpolicy.py and bench/topk.py save their results with `save`; the PNGs go beside the JSON,
named <bench>-<metric>-vs-<axis>.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kd.stages.report import line_plot

AXES = {"teacher_tokens": "teacher tokens", "train_seconds": "training wall seconds", "loop_seconds": "loop wall seconds"}
METRICS = {"heldout_reverse_kl": "held-out reverse KL / token", "accuracy": "held-out greedy accuracy"}
STYLES = ("o-", "s-", "^-", "D-", "v-", "x-", "*-")


def point_table(curves: dict[str, list[dict]], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown lines of a table of every curve's points, one row a point: `columns` lists (header,
    point key, format spec) after the run's name, e.g. ("epoch", "epoch", ".0f")."""
    lines = ["| run | " + " | ".join(header for header, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, curve in curves.items():
        for point in curve:
            lines.append(f"| {name} | " + " | ".join(format(point[key], spec) for _, key, spec in columns) + " |")
    return lines


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Several seeds' curves averaged point by point (they evaluate at the same epochs or steps)."""
    return [{key: sum(point[key] for point in points) / len(points) for key in points[0]} for points in zip(*curves)]


def save(results: Path, name: str, result: dict, markdown: str) -> None:
    """A benchmark's results: <name>.json, <name>.md and the curves' PNGs in `results`; the table printed."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / f"{name}.md").write_text(markdown)
    write(results / f"{name}.json")
    print(markdown)


def write(result_file: Path) -> list[Path]:
    result_file = Path(result_file)
    curves: dict[str, list[dict]] = json.loads(result_file.read_text()).get("curves", {})
    written = []
    for axis, axis_label in AXES.items():
        if not any(points and axis in points[0] for points in curves.values()):
            continue
        for metric, metric_label in METRICS.items():
            if not any(points and points[0].get(metric) is not None for points in curves.values()):
                continue
            lines = [
                (name, ([p[axis] for p in points], [p[metric] for p in points]), STYLES[i % len(STYLES)])
                for i, (name, points) in enumerate(curves.items()) if points and axis in points[0]
            ]
            path = result_file.with_name(f"{result_file.stem}-{metric.replace('heldout_reverse_kl', 'kl')}-vs-{axis}.png")
            line_plot(path, f"{result_file.stem}: {metric_label}", axis_label, lines)
            written.append(path)
    return written


if __name__ == "__main__":
    files = sys.argv[1:] or sorted(Path(__file__).resolve().parent.joinpath("results").glob("*.json"))
    for file in files:
        for path in write(Path(file)):
            print(path)
