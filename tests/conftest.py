"""Shared fixtures: a tiny toy world (real Qwen3 models, real tokenizer, real files), built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kd.stages import config as config_lib
from kd.stages.config import ToyConfig
from kd.stages.tasks.toy import build

# Small enough to build in seconds, trained enough that teacher and student clearly differ.
TINY = ToyConfig(
    seed=0, train_prompts=96, heldout_prompts=16, width=64, teacher_layers=2, student_layers=1,
    teacher_steps=120, student_steps=20, student_stop_accuracy=1.0, sft_lr=3e-3, sft_batch_size=32, vocab_size=280,
)


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The real toy world of configs/toy.yaml, at its usual place (runs/toy-world): built once
    (about 3 minutes on 2 cores) and shared with `just loop`."""
    config = config_lib.load()
    world = Path(config.toy_dir)
    build(config.toy, world, log=lambda *_: None)
    return world


@pytest.fixture
def toy_config_file(toy_world, tmp_path):
    """Writes the shipped toy config, with overrides, for a run under tmp_path."""
    import yaml

    def write(**overrides) -> Path:
        settings = {"runs_dir": str(tmp_path / "runs"), **overrides}
        config = config_lib.load(None, [f"{key}={value}" for key, value in settings.items()])
        path = tmp_path / "toy.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("world") / "toy-world"
    build(TINY, world, log=lambda *_: None)
    return world


def tiny_config(world: Path, runs: Path, **overrides) -> config_lib.Config:
    """A run on the tiny world; `overrides` are `section.key` -> value."""
    settings = {
        "run_id": "t", "runs_dir": str(runs), "epochs": 2,
        "student": str(world / "student"), "teacher": str(world / "teacher"),
        "generate.prompts": str(world / "prompts" / "train.jsonl.zst"),
        "generate.prompts_per_epoch": 8, "generate.samples_per_prompt": 2, "generate.max_new_tokens": 40,
        "generate.engine.device": "cpu", "generate.engine.dtype": "float32",
        "score.engine.device": "cpu", "score.engine.dtype": "float32",
        "train.batch_size": 8, "train.grad_accum": 2, "train.learning_rate": 3e-3, "train.warmup_steps": 0,
        "train.precision": "float32",
        "eval.prompts": str(world / "prompts" / "heldout.jsonl.zst"), "eval.num_prompts": 16, "eval.every": 1,
        **overrides,
    }
    data: dict = {}
    for key, value in settings.items():
        config_lib.apply_override(data, f"{key}={value}")
    return config_lib.build(config_lib.Config, data, where="")


def routed_prompts(world: Path, path: Path) -> dict[str, str]:
    """Writes `world`'s train prompts to `path` with every third one routed to the teacher named echo
    (field `domain`); returns each prompt id's teacher."""
    from kd.stages import datasets_io

    rows = datasets_io.read_prompt_rows(world / "prompts" / "train.jsonl.zst")
    for number, row in enumerate(rows):
        if number % 3 == 0:
            row["domain"] = "echo"
    datasets_io.write_jsonl_zst(path, rows)
    return {str(row.get("id", f"row-{n}")): row.get("domain", "default") for n, row in enumerate(rows, 1)}


@pytest.fixture
def make_config(tiny_world, tmp_path):
    return lambda **overrides: tiny_config(tiny_world, tmp_path / "runs", **overrides)


@pytest.fixture
def config_file(tiny_world, tmp_path):
    """Writes a tiny-world run config to a YAML file, as a user would hand it to `kd`."""
    import yaml

    def write(**overrides) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tiny_world, tmp_path / "runs", **overrides).to_dict()))
        return path

    return write


@pytest.fixture(autouse=True)
def _single_thread():
    # Two cores: keep test timings stable and leave room for subprocesses.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
