"""Retune and resume: the fields marked `retunable` (kd.stages.config) are left out of the run's
fingerprint, so a run stopped after an epoch resumes under new values of them, and writes what the
unchanged run writes: byte for byte where the arithmetic is the same, to float tolerance where a
kernel or a batch shape changes the order of float operations."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from safetensors.numpy import load_file

from kd.stages import config as config_lib, datasets_io, loop, rundir, verify
from kd.stages.schemas import EVAL, ROLLOUTS, SCORED, TRAIN_STEPS
from kd.stages.errors import KdError
from tests.conftest import tiny_config

# ---- pure: the fingerprint and the changed-config error ------------------------------------------

# Every engine of the run is a server (so that server-mode fields can change) and a second teacher
# is routed to: every kind of place a config dataclass sits in (nested, in a dict, optional).
SERVED = [
    "generate.engine.kind=vllm", "generate.engine.server=http://10.0.0.1:8000",
    "score.engine.kind=vllm", "score.engine.server=http://10.0.0.1:8001",
    "score.route_by=domain", "score.teachers.echo.model=runs/echo",
    "score.teachers.echo.engine.kind=vllm", "score.teachers.echo.engine.server=http://10.0.0.1:8002",
]

# Another valid value of each retunable field that a plain rule (bool: not, int: +1, float) cannot give.
ALTERNATES = {
    "server": ["http://10.0.0.9:9000", "http://10.0.0.10:9000"], "served_model": "teacher-32b", "device": "cuda:1",
    "attn_implementation": "eager",
    "run_id": "moved", "runs_dir": "elsewhere",
    "replica": {"kind": "vllm", "server": "http://10.0.0.3:8000"},
    "slurm": {"partition": "gpu", "train": {"tasks": 2, "gpus": 1}},
    "overlap": {"sampler_threads": 1, "trainer_threads": 1, "sampler_devices": "1"},
    "report_to": ["tensorboard", "wandb"], "wandb": {"project": "p", "name": "n", "entity": "e", "tags": ["t"]},
}


def retunable_fields(value, prefix: str = ""):
    """(dotted name, value) of each field marked retunable in each config dataclass within `value`."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            name, item = f"{prefix}{field.name}", getattr(value, field.name)
            if config_lib.changes_results(type(value), field.name):
                yield from retunable_fields(item, f"{name}.")
            else:
                yield name, item
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from retunable_fields(item, f"{prefix}{key}.")


def another(name: str, value):
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ALTERNATES:
        return ALTERNATES[leaf]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.25
    raise AssertionError(f"no other value for {name}: add one to ALTERNATES")


def with_value(config: config_lib.Config, name: str, value) -> config_lib.Config:
    data = config.to_dict()
    *parents, leaf = name.split(".")
    parent = data
    for key in parents:
        parent = parent[key]
    parent[leaf] = value
    return config_lib.build(config_lib.Config, data, where="")


def test_no_retunable_field_changes_the_fingerprint():
    base = config_lib.load(None, SERVED)
    fields = dict(retunable_fields(base))
    for name, value in fields.items():
        changed = with_value(base, name, another(name, value))
        assert config_lib.results_part(changed) == config_lib.results_part(base), name
        assert changed.to_dict() != base.to_dict() and changed.fingerprint() == base.fingerprint(), name
    # The walk reached every place a config dataclass sits: top level, nested, optional, in a dict.
    assert {"epochs", "run_id", "runs_dir", "keep_epochs", "keep_adapters_every", "slurm", "overlap", "report_to", "wandb", "generate.engine.max_batch_rows", "score.engine.server",
            "score.replica", "score.self_check", "score.self_check_tolerance", "score.teachers.echo.replica",
            "score.teachers.echo.engine.concurrency", "train.max_ratio", "train.logging_steps",
            "train.gradient_checkpointing", "train.attn_implementation", "train.micro_batch_tokens",
            "train.device"} <= set(fields)
    # Each is declared where its dataclass defines it: nothing else is left out.
    classes = [cls for cls in vars(config_lib).values() if isinstance(cls, type) and dataclasses.is_dataclass(cls)]
    declared = {field.name for cls in classes for field in dataclasses.fields(cls)
                if not config_lib.changes_results(cls, field.name)}
    assert {name.rsplit(".", 1)[-1] for name in fields} == declared


@pytest.mark.parametrize("override", [
    "train.batch_size=32", "train.grad_accum=2", "train.learning_rate=0.01", "generate.temperature=0.7", "seed=1",
    "score.engine.dtype=bfloat16", "score.teachers.echo.engine.dtype=float32", "score.teachers.echo.kl_weight=0.5",
])
def test_fields_that_change_results_change_the_fingerprint(override):
    assert config_lib.load(None, [*SERVED, override]).fingerprint() != config_lib.load(None, SERVED).fingerprint()


def test_a_changed_config_is_refused_naming_only_what_changes_results(tmp_path):
    base = config_lib.load(None, [*SERVED, f"runs_dir={tmp_path}"])
    rundir.prepare(base)
    changed = config_lib.load(None, [*SERVED, f"runs_dir={tmp_path}", "train.learning_rate=0.5",
                                     "score.engine.server=http://10.0.0.2:8001", "generate.engine.max_batch_rows=7"])
    with pytest.raises(KdError) as err:
        rundir.prepare(changed)
    assert "differs in train.learning_rate)" in str(err.value)
    # Retuned alone, it is the same run: accepted, and the run's config.yaml takes the new values.
    retuned = config_lib.load(None, [*SERVED, f"runs_dir={tmp_path}", "score.engine.server=http://10.0.0.2:8001",
                                     "generate.engine.max_batch_rows=7", "train.micro_batch_tokens=256"])
    rundir.prepare(retuned)
    saved = config_lib.build(config_lib.Config, yaml.safe_load((base.run_dir / "config.yaml").read_text()), where="")
    assert saved == retuned


# ---- end to end: stop after epoch 0, retune, resume ---------------------------------------------

SMALL = {"eval.every": 1, "eval.num_prompts": 4}
DATASETS = {"rollouts": ROLLOUTS, "scored": SCORED, "train": TRAIN_STEPS, "eval": EVAL}


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory) -> Path:
    """`reference`: 2 epochs with the defaults, uninterrupted; `stopped`: the same run stopped after
    epoch 0 (`kd loop` with epochs 1, which a constant learning rate lets grow)."""
    runs = tmp_path_factory.mktemp("retune")
    loop.run(tiny_config(tiny_world, runs, run_id="reference", **SMALL))
    loop.run(tiny_config(tiny_world, runs, run_id="stopped", epochs=1, **SMALL))
    return runs


def resumed(runs: Path, world: Path, name: str, retuned: dict) -> Path:
    """A copy of the stopped run, resumed to epoch 2 under the retuned fields."""
    shutil.copytree(runs / "stopped", runs / name)
    config = tiny_config(world, runs, run_id=name, **SMALL, **retuned)
    loop.run(config)  # refused if the retuned fields changed the fingerprint
    saved = yaml.safe_load((runs / name / "config.yaml").read_text())
    for key, value in retuned.items():
        section, field = key.rsplit(".", 1)
        assert _get(saved, section)[field] == value, key
    assert not any(verify.run(runs / name)["datasets"].values())
    return runs / name


def _get(data: dict, dotted: str) -> dict:
    for key in dotted.split("."):
        data = data[key]
    return data


def tables(run: Path, epoch: int) -> dict[str, pa.Table]:
    directories = {name: run / f"{epoch:04d}" / name for name in DATASETS}
    return {name: datasets_io.read_table(directory, DATASETS[name])
            for name, directory in directories.items() if datasets_io.is_complete(directory)}


def adapter(run: Path, epoch: int) -> dict[str, np.ndarray]:
    return load_file(str(run / f"{epoch:04d}" / "adapter" / "adapter_model.safetensors"))


def assert_same_run(ours: Path, reference: Path, atol: float | None = None) -> None:
    """Every dataset and adapter of epochs 0-2 as the reference wrote it: byte for byte (atol None), or
    with the same token ids and every float within atol."""
    for epoch in range(3):
        theirs, mine = tables(reference, epoch), tables(ours, epoch)
        assert set(mine) == set(theirs), epoch
        for name, table in theirs.items():
            if atol is None:
                assert mine[name].equals(table), (epoch, name)
                continue
            assert mine[name].num_rows == table.num_rows, (epoch, name)
            for column in table.column_names:
                a, b = table[column].to_pylist(), mine[name][column].to_pylist()
                kind = table.schema.field(column).type
                if pa.types.is_floating(kind) or (pa.types.is_list(kind) and pa.types.is_floating(kind.value_type)):
                    for x, y in zip(a, b):
                        assert (x is None) == (y is None), (epoch, name, column)
                        if x is not None:
                            np.testing.assert_allclose(y, x, rtol=0, atol=atol, err_msg=f"{epoch} {name} {column}")
                else:
                    assert a == b, (epoch, name, column)
        if epoch < 2:
            paths = [run / f"{epoch:04d}" / "adapter" / "adapter_model.safetensors" for run in (reference, ours)]
            if atol is None:
                assert paths[0].read_bytes() == paths[1].read_bytes(), epoch
            else:
                theirs_w, mine_w = adapter(reference, epoch), adapter(ours, epoch)
                assert set(mine_w) == set(theirs_w)
                for key, weight in theirs_w.items():
                    np.testing.assert_allclose(mine_w[key], weight, rtol=0, atol=atol, err_msg=f"{epoch} {key}")


def test_stopped_run_is_the_reference_so_far(runs):
    assert (runs / "stopped" / "0000" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs / "reference" / "0000" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (runs / "stopped" / "0001" / "adapter").exists()


def test_retuned_guards_and_connection_write_the_same_bytes(runs, tiny_world):
    """Guards, the self-check, where train runs (cpu is what auto picks here) and the vLLM-only engine
    settings (the hf engine has no use for them) change nothing that is computed."""
    retuned = {"train.max_ratio": 50.0, "train.device": "cpu", "score.self_check": 0, "score.self_check_tolerance": 0.5}
    for engine in ("generate.engine", "score.engine"):
        retuned.update({f"{engine}.gpu_memory_utilization": 0.5, f"{engine}.cpu_kvcache_gib": 2,
                        f"{engine}.tensor_parallel_size": 2, f"{engine}.enforce_eager": True,
                        f"{engine}.request_timeout": 5.0, f"{engine}.max_retries": 0, f"{engine}.concurrency": 2})
    assert_same_run(resumed(runs, tiny_world, "guards", retuned), runs / "reference")


def test_retuned_logging_steps_writes_the_same_bytes(runs, tiny_world):
    assert_same_run(resumed(runs, tiny_world, "logging", {"train.logging_steps": 2}), runs / "reference")


def test_retuned_engine_batches_write_the_same_to_float_tolerance(runs, tiny_world):
    """Other batch bounds put other rows together and pad them to another length. The tokens are the
    same; the numbers are not bitwise: on CPU a float32 matmul gives a row other last bits in a batch
    of another size (BLAS picks its kernel and blocking by the shape), and a padded key changes the
    attention's reduction."""
    retuned = {"generate.engine.max_batch_rows": 3, "generate.engine.max_batch_tokens": 200,
               "score.engine.max_batch_rows": 5, "score.engine.max_batch_tokens": 150}
    assert_same_run(resumed(runs, tiny_world, "batches", retuned), runs / "reference", atol=1e-5)


@pytest.mark.parametrize("retuned", [
    {"train.gradient_checkpointing": False},
    {"train.attn_implementation": "eager"},
    {"train.micro_batch_tokens": 64},
], ids=lambda retuned: next(iter(retuned)).split(".")[-1])
def test_retuned_kernels_write_the_same_to_float_tolerance(runs, tiny_world, retuned):
    """Another attention kernel, recomputed activations, or packed rows: the same math, other float
    operations (measured: adapters within 3e-6 of the reference; gradient checkpointing is bitwise)."""
    name = "kernel-" + next(iter(retuned)).split(".")[-1]
    assert_same_run(resumed(runs, tiny_world, name, retuned), runs / "reference", atol=1e-5)
