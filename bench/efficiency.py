"""Stage efficiency on the toy world: each stage's wall time against the bare model work it contains.

    python bench/efficiency.py            (just bench-efficiency)

Runs EPOCHS epochs of the toy config (hf engine; its objective as measured: bench/toy_before.py)
through the stage functions in one process, as `kd loop` does, and after each epoch but the first
(which loads the models) times the bare model work over that epoch's data; on a shared machine
sub-second timings drift by more than the gap measured, so each ratio is the median of the epochs'
bare/stage ratios, each pair timed back to back, over TRIALS fresh runs (each trial's median is reported too):
- score: stage wall vs the teacher's batched forward over the same sequences, in the same
  length-sorted batches (no log-softmax, no gather, no I/O);
- train: stage wall vs a bare forward + backward + AdamW step of the LoRA student over the same
  collated batches (model already loaded; no Trainer, no checkpoint, no I/O);
- generate: tokens/s (engines compared in bench/results/engines.md);
- dataset I/O: writing and reading the last epoch's datasets as a share of its stage's median wall
  time, and bytes on disk with zstd against uncompressed Arrow.
Writes bench/results/efficiency.json and bench/results/efficiency.md.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from toy_before import SAMPLED_TOKEN_CONSTANT_LR  # bench/ is on sys.path: run as `python bench/...`

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EPOCHS = 12  # epoch 0 loads the models; the other 11 are measured
TRIALS = 3  # fresh runs: the epochs' ratios scatter by a few hundredths on this shared machine
REPEATS = 5  # dataset writes and reads: the least of 5


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def flat(trials: list[list[float]]) -> list[float]:
    return [value for trial in trials for value in trial]


def best_of(fn, output: Path | None = None) -> float:
    """Least wall seconds of `fn()` over REPEATS runs, removing `output` before each (stages skip done work)."""
    best = float("inf")
    for _ in range(REPEATS):
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        best = min(best, timed(fn)[0])
    return best


def bare_score(session, table):
    """The teacher's model work over the scored sequences (its prompts as it sees them), in the
    stage's length-sorted batches: the forward to the last hidden states and the head on the
    completion positions (no log-softmax, no gather, no I/O)."""
    import torch

    from kd.stages.engines import length_batches
    from kd.stages.engines.hf import right_pad
    from kd.stages.models import OutputHead, hidden_states

    engine = session.engine("teacher", session.config.score.engine)
    head = OutputHead(engine.base)
    prompts = table.column("teacher_prompt_token_ids").to_pylist()
    sequences = [p + c for p, c in zip(prompts, table.column("completion_token_ids").to_pylist())]
    batches = length_batches([len(s) for s in sequences], engine.max_batch_tokens, engine.max_batch_rows)
    padded = [(right_pad([sequences[i] for i in batch], engine.pad_token_id), [len(prompts[i]) for i in batch])
              for batch in batches]

    @torch.no_grad()
    def forward() -> None:
        for (ids, mask), starts in padded:
            hidden = hidden_states(engine.model, ids, mask)
            head(torch.cat([hidden[r, start - 1 : int(mask[r].sum()) - 1] for r, start in enumerate(starts)]))

    return forward


def bare_train(config, epoch: int):
    """Forward + backward + AdamW of the LoRA student over the train stage's batches (model loaded once),
    the loss computed as the stage computes it (completion positions, chunked head)."""
    import torch

    from kd.stages import datasets_io, pipeline
    from kd.stages.schemas import SCORED
    from kd.stages.objective import step_loss
    from kd.stages.policy import Policy
    from kd.stages.train import Collator, features

    source = pipeline.stage_dir(config, epoch, "scored")
    examples = features(datasets_io.read_table(source, SCORED), config.train, source)
    policy = Policy(config)
    model = policy.load(pipeline.stage_dir(config, epoch - 1, "adapter")).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.learning_rate)
    collate = Collator(model.config.pad_token_id or 0)
    size = config.train.batch_size
    batches = [collate(examples[i : i + size]) for i in range(0, len(examples), size)]

    def steps() -> None:
        for batch in batches:
            step_loss(model, policy.head, batch, config.train, (batch["shift_labels"] != -100).sum(), 1).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    return steps


def io_costs(config, epoch: int, stage_seconds: dict) -> list[dict]:
    import pyarrow as pa

    from kd.stages import datasets_io, pipeline
    from kd.stages.schemas import ROLLOUTS, SCORED

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for stage, name, kind in (("generate", "rollouts", ROLLOUTS), ("score", "scored", SCORED)):
            directory = pipeline.stage_dir(config, epoch, name)
            table = datasets_io.read_table(directory, kind)
            read_seconds = best_of(lambda: datasets_io.read_table(directory, kind))
            out = Path(scratch) / name
            write_seconds = best_of(lambda: datasets_io.write_dataset(out, kind, table, {}, [], {}, time.time()), out)
            plain = Path(scratch) / f"{name}.uncompressed.arrow"
            with pa.OSFile(str(plain), "wb") as sink, pa.ipc.new_file(sink, kind.schema) as writer:
                writer.write_table(table.cast(kind.schema))
            zstd_bytes = sum(p.stat().st_size for p in out.glob("*.arrow"))
            rows.append({
                "dataset": name, "rows": table.num_rows, "write_seconds": write_seconds, "read_seconds": read_seconds,
                "share_of_stage": (write_seconds + read_seconds) / stage_seconds[stage],
                "zstd_bytes": zstd_bytes, "uncompressed_bytes": plain.stat().st_size,
            })
    return rows


def main() -> None:
    from importlib.metadata import version

    from kd.stages import config as config_lib, datasets_io, export_lora, generate, pipeline, rundir, score, train
    from kd.stages.schemas import SCORED
    from kd.stages.session import Session

    seconds: dict[str, list[list[float]]] = {"generate": [], "score": [], "train": []}
    bare: dict[str, list[list[float]]] = {"score": [], "train": []}
    tokens = samples = 0
    for trial in range(TRIALS):
        runs = Path(tempfile.mkdtemp(prefix="kd-bench-efficiency-"))
        config = config_lib.load(ROOT / "configs" / "toy.yaml", list(SAMPLED_TOKEN_CONSTANT_LR))
        config = dataclasses.replace(config, run_id="efficiency", runs_dir=str(runs), epochs=EPOCHS)
        rundir.prepare(config)
        for timings in (*seconds.values(), *bare.values()):
            timings.append([])
        with Session(config, progress=False) as session:
            for epoch in range(EPOCHS):
                stage_seconds = {
                    "generate": timed(generate.run, config, epoch, session)[0],
                    "score": timed(score.run, config, epoch, session)[0],
                    "train": timed(train.run, config, epoch, session, progress=False)[0],
                }
                export_lora.run(config, epoch)
                if epoch == 0:
                    continue  # the first calls also load the engines and the student
                scored = datasets_io.read_table(pipeline.stage_dir(config, epoch, "scored"), SCORED)
                tokens += sum(len(c) for c in scored.column("completion_token_ids").to_pylist())
                samples += scored.num_rows
                for stage, value in stage_seconds.items():
                    seconds[stage][-1].append(value)
                bare["score"][-1].append(timed(bare_score(session, scored))[0])
                bare["train"][-1].append(timed(bare_train(config, epoch))[0])
        if trial < TRIALS - 1:
            shutil.rmtree(runs, ignore_errors=True)
    epochs = TRIALS * (EPOCHS - 1)

    def ratios(stage: str) -> list[list[float]]:
        return [[b / s for s, b in zip(stage_trial, bare_trial)] for stage_trial, bare_trial in zip(seconds[stage], bare[stage])]

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only",
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "pyarrow")},
        "trials": TRIALS, "epochs": EPOCHS - 1, "completion_tokens": tokens / epochs, "samples": samples / epochs,
        "stages": [
            {"stage": stage, "stage_seconds": statistics.median(flat(seconds[stage])),
             "stage_tokens_per_second": tokens / sum(flat(seconds[stage])),
             "bare_seconds": statistics.median(flat(bare[stage])) if stage in bare else None,
             "ratio": statistics.median(flat(ratios(stage))) if stage in bare else None,
             "trial_ratios": [statistics.median(trial) for trial in ratios(stage)] if stage in bare else None,
             "seconds": seconds[stage], "bare": bare.get(stage)}
            for stage in seconds
        ],
        "io": io_costs(config, EPOCHS - 1, {stage: statistics.median(flat(values)) for stage, values in seconds.items()}),
    }
    shutil.rmtree(runs, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "efficiency.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "efficiency.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# Stage efficiency (toy world, hf engine, the stages as `kd loop` runs them)",
        "",
        f"{result['date']}, {result['machine']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())}. "
        f"{result['trials']} fresh runs, epochs 1-{result['epochs']} of each, {result['samples']:.0f} samples and "
        f"{result['completion_tokens']:.0f} completion tokens an epoch; each epoch's bare work timed right after "
        "its stage. `python bench/efficiency.py`.",
        "",
        "| stage | stage s (median) | tokens/s | bare model work s (median) | bare / stage (median of all epochs) | per run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in result["stages"]:
        bare = "" if s["bare_seconds"] is None else f"{s['bare_seconds']:.3f}"
        ratio = "" if s["ratio"] is None else f"{s['ratio']:.2f}"
        trials = "" if s["trial_ratios"] is None else ", ".join(f"{r:.2f}" for r in s["trial_ratios"])
        lines.append(f"| {s['stage']} | {s['stage_seconds']:.3f} | {s['stage_tokens_per_second']:.0f} | {bare} | {ratio} | {trials} |")
    lines += ["", "| dataset | rows | write s | read s | I/O share of its stage | zstd bytes | uncompressed bytes |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for io in result["io"]:
        lines.append(f"| {io['dataset']} | {io['rows']} | {io['write_seconds']:.4f} | {io['read_seconds']:.4f} "
                     f"| {io['share_of_stage']:.1%} | {io['zstd_bytes']} | {io['uncompressed_bytes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
