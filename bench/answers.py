"""Greedy replies of finished runs, by phrasing and by question: what a gap in task accuracy is made of.

    python bench/answers.py RUN_DIR... [--epoch E] [--name answers]        (reads; runs no model)

Each RUN_DIR holds kd eval datasets (<epoch:04d>/eval): a `kd loop` run, or what bench/quality.py
keeps of its off-policy arm and its baselines (runs/bench-<name>-off-policy-seed<s>, -teacher,
-student). Runs whose names differ only in a trailing -seed<N> form one group, in the order given,
named without the prefix all runs share.
Each run's last evaluation is read (--epoch: that one instead). Phrasing: the greedy reply up to its
last integer with every integer written N ("N + N = N", "The sum of N and N is N"), the form the
`last-integer` verifier reads. Writes bench/results/<name>.md: each group's greedy accuracy by
phrasing, and per held-out question how many of its runs are right (a one-run group: its reply).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INTEGER = re.compile(r"-?\d+")
SHOWN = 40  # characters of a phrasing or reply in the tables


def phrasing(reply: str) -> str:
    """`reply` up to its last integer, integers as N, whitespace collapsed; "(no integer)" if it has none."""
    ends = [match.end() for match in INTEGER.finditer(reply)]
    if not ends:
        return "(no integer)"
    return " ".join(INTEGER.sub("N", reply[: ends[-1]]).split())


def shorten(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def greedy_rows(run: Path, epoch: int | None) -> tuple[int, list[dict]]:
    """The epoch read and the greedy rows (prompt_id, answer, completion_text, reward) of `run`'s eval."""
    from kd.stages import datasets_io
    from kd.stages.schemas import EVAL

    done = sorted(int(path.parent.name) for path in run.glob("[0-9][0-9][0-9][0-9]/eval") if datasets_io.is_complete(path))
    if not done:
        raise SystemExit(f"{run}: no complete eval dataset (<epoch:04d>/eval); pass a run that kd loop or "
                         "bench/quality.py evaluated")
    chosen = done[-1] if epoch is None else epoch
    if chosen not in done:
        raise SystemExit(f"{run}: no complete eval at epoch {epoch} (evaluated: {', '.join(map(str, done))}); "
                         "pass one of those to --epoch")
    table = datasets_io.read_table(run / f"{chosen:04d}" / "eval", EVAL)
    rows = [row for row in table.select(["prompt_id", "answer", "completion_text", "reward", "decoding"]).to_pylist()
            if row["decoding"] == "greedy"]
    return chosen, rows


def markdown(groups: dict[str, dict[str, list[dict]]], epochs: dict[str, int], command: str) -> str:
    by_epoch = defaultdict(list)
    for run, epoch in epochs.items():
        by_epoch[epoch].append(run)
    read = "; ".join(f"{epoch} ({', '.join(runs)})" for epoch, runs in by_epoch.items())
    lines = [
        "# Greedy replies by phrasing and by question",
        "",
        f"{time.strftime('%Y-%m-%d')}. `{command}`. Read: each run's evaluation at epoch "
        f"{read}. Phrasing: the greedy reply up to "
        "its last integer, integers written N; a phrasing under 5% of a group's replies is counted in "
        "\"other phrasings\".",
        "",
        "| group (runs) | phrasing | replies | right | accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for group, runs in groups.items():
        rows = [row for run_rows in runs.values() for row in run_rows]
        replies, right = Counter(), Counter()
        for row in rows:
            replies[phrasing(row["completion_text"])] += 1
            right[phrasing(row["completion_text"])] += row["reward"]
        common = [form for form, count in replies.most_common() if count >= 0.05 * len(rows)]
        other = [form for form in replies if form not in common]
        label = f"{group} ({len(runs)})"
        for form, forms in [*((f"`{shorten(form)}`", [form]) for form in common), ("other phrasings", other)]:
            count, hits = sum(replies[f] for f in forms), sum(right[f] for f in forms)
            if count:
                lines.append(f"| {label} | {form} | {count} | {hits:.0f} | {hits / count:.1%} |")
                label = ""
        lines.append(f"| | all | {len(rows)} | {sum(right.values()):.0f} | {sum(right.values()) / len(rows):.1%} |")
    questions = list(dict.fromkeys(row["prompt_id"] for runs in groups.values() for rows in runs.values() for row in rows))
    answers = {row["prompt_id"]: row["answer"] for runs in groups.values() for rows in runs.values() for row in rows}
    lines += ["", "Per held-out question: runs right (a one-run group: ✓ or ✗ and its reply).", "",
              f"| question | answer | {' | '.join(groups)} |", f"|---|---:|{'---|' * len(groups)}"]
    for question in questions:
        cells = []
        for runs in groups.values():
            found = [row for rows in runs.values() for row in rows if row["prompt_id"] == question]
            if len(runs) == 1 and found:
                cells.append(f"{'✓' if found[0]['reward'] else '✗'} {shorten(found[0]['completion_text'])}")
            else:
                cells.append(f"{sum(row['reward'] for row in found):.0f}/{len(found)}")
        lines.append(f"| {question} | {answers[question]} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--epoch", type=int, help="read this epoch's evaluation of every run (default: each run's last)")
    parser.add_argument("--name", default="answers", help="the results file's stem (bench/results/<name>.md)")
    options = parser.parse_args()
    groups: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    epochs = {}
    names = [run.resolve().name for run in options.runs]
    shared = os.path.commonprefix(names).rpartition("-")[0] + "-" if len(set(names)) > 1 else ""
    for run in options.runs:
        run = run.resolve()
        epochs[run.name], rows = greedy_rows(run, options.epoch)
        # The group is the run's name without its seed and without the prefix every run shares.
        groups[re.sub(r"-seed\d+$", "", run.name)[len(shared):] or run.name][run.name] = rows
    command = " ".join(["python bench/answers.py", *(str(run) for run in options.runs),
                        *(["--epoch", str(options.epoch)] if options.epoch is not None else []),
                        *(["--name", options.name] if options.name != "answers" else [])])
    out = RESULTS / f"{options.name}.md"
    out.write_text(markdown(groups, epochs, command))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
