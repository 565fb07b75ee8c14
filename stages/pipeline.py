"""The pipeline, declared once: the stages of an epoch, what each reads and writes, which shard.

    epoch e:   generate -> score -> train -> export-lora        (every epoch 0 .. epochs-1)
                  |          |        |          |
               rollouts -> scored -> train/ -> adapter  ==> the policy that samples at epoch e+1+s
    eval at 0, k, 2k, ..., epochs: the policy of that epoch on held-out prompts -> eval

s is the config's max_staleness (0 by default: each epoch samples with the adapter trained just
before it). With s >= 1 the sampling side of epoch e+s (generate, score) needs nothing that
training epoch e writes, so `kd loop` runs the two at once and `kd slurm`'s job dependencies let
them; train corrects for the older sampler by importance sampling (kd.stages.loss).

`kd loop`, `kd slurm`, `kd status`, the CLI's stage commands and the kill-anywhere tests all
iterate STAGES; nothing else lists them. Each stage is a module kd.stages.<module> with
`run(config, epoch, session=None, **options) -> Path` (the dataset directory it wrote or found
complete). Torch-free: `kd status` and the data layer import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports the data layer, which imports this table
    from kd.stages.config import Config


@dataclass(frozen=True)
class Stage:
    """One stage. `command`: the CLI command and Slurm job suffix; `output`: the dataset directory it
    writes under runs/<id>/<epoch>/ (its dataset kind of kd.stages.schemas has the same name);
    `inputs`: the datasets it reads, "name" of the same epoch, "name@-1" of the previous one, or
    "name@-1-s" of epoch e-1-s, s the config's max_staleness (the adapter generate samples with);
    `shardable`: generate and score split over array tasks (--shard / --num-shards);
    `every_epoch`: runs at epochs 0 .. epochs-1, else at the eval epochs (see `eval_epochs`);
    `engines`: the roles of the engines it runs ("student", "teacher"): before it, `kd loop` puts the
    others to sleep (kd.stages.session), so train runs with none awake on the GPU."""

    command: str
    output: str
    module: str
    inputs: tuple[str, ...]
    shardable: bool = False
    every_epoch: bool = True
    engines: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The command as an identifier: its Slurm resources field (slurm.export_lora) and lock name."""
        return self.command.replace("-", "_")

    def load(self) -> ModuleType:
        return importlib.import_module(f"kd.stages.{self.module}")


GENERATE = Stage("generate", "rollouts", "generate", ("adapter@-1-s",), shardable=True, engines=("student",))
SCORE = Stage("score", "scored", "score", ("rollouts",), shardable=True, engines=("teacher",))
TRAIN = Stage("train", "train", "train", ("scored", "train@-1"))
EXPORT_LORA = Stage("export-lora", "adapter", "export_lora", ("train",))
EVAL = Stage("eval", "eval", "evaluate", ("adapter@-1",), every_epoch=False, engines=("student", "teacher"))

EPOCH = (GENERATE, SCORE, TRAIN, EXPORT_LORA)  # an epoch's stages, in order
STAGES = (EVAL, *EPOCH)  # as an epoch's row reads: the policy it starts with is evaluated first


def by_command(command: str) -> Stage:
    return next(stage for stage in STAGES if stage.command == command)


def by_output(output: str) -> Stage | None:
    return next((stage for stage in STAGES if stage.output == output), None)


def eval_epochs(config: Config) -> list[int]:
    """Epochs at which EVAL runs: 0, every, 2 x every, ... and `epochs` (the policy after training)."""
    return sorted(set(range(0, config.epochs, config.eval.every)) | {config.epochs})


def runs_at(stage: Stage, epoch: int, config: Config) -> bool:
    return epoch < config.epochs if stage.every_epoch else epoch in eval_epochs(config)


OFFSETS = {"": 0, "-1": 1, "-1-s": None}  # how far back an input's "@..." reaches (None: 1 + max_staleness)


def inputs_at(stage: Stage, epoch: int, staleness: int) -> list[tuple[int, str]]:
    """(epoch, output) of each dataset `stage` reads at `epoch` when the run's max_staleness is
    `staleness`; an input before epoch 0 is nothing (generate then samples with the base student)."""
    wanted = []
    for entry in stage.inputs:
        name, _, offset = entry.partition("@")
        back = OFFSETS[offset]
        wanted.append((epoch - (1 + staleness if back is None else back), name))
    return [(e, name) for e, name in wanted if e >= 0]


def readers_of(config: Config, epoch: int, output: str) -> list[tuple[int, Stage]]:
    """(epoch, stage) of every stage of the run that reads dataset `output` of `epoch` (the inverse of
    inputs_at, over the epochs the run has): once they are all complete, nothing needs it any more."""
    reach = 2 + config.max_staleness  # no input reaches further back than 1 + s epochs
    return [(e, stage) for stage in STAGES for e in range(epoch, epoch + reach)
            if runs_at(stage, e, config) and (epoch, output) in inputs_at(stage, e, config.max_staleness)]


def stage_dir(config: Config, epoch: int, output: str) -> Path:
    """runs/<id>/<epoch:04d>/<output>: where the stage writing `output` puts it."""
    if by_output(output) is None:
        raise ValueError(f"{output!r} is not a stage's output ({', '.join(s.output for s in STAGES)})")
    return config.run_dir / f"{epoch:04d}" / output


def policy_adapter_dir(config: Config, epoch: int, stage: Stage = GENERATE) -> Path | None:
    """The adapter `stage` (generate: the policy that samples; eval: the one evaluated) reads at
    `epoch`, as the table declares it: export-lora's of epoch e-1-s for generate, e-1 for eval;
    None before epoch 0 (the base student). train/adapter beside the optimiser state is train's
    checkpoint, not the policy."""
    found = [e for e, name in inputs_at(stage, epoch, config.max_staleness) if name == EXPORT_LORA.output]
    return stage_dir(config, found[0], EXPORT_LORA.output) if found else None
