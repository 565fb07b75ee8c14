"""The GPU memory plan on a GPU (kd.stages.session): engines give their memory back while other
stages run, wake with the same model and adapter, and go on the GPU they are given.

Skipped without CUDA (tests/test_sleep.py checks the order of sleeps and wakes on CPU); the vLLM
tests also without vLLM. On a GPU machine: `python -m pytest -q tests/test_gpu.py`, or
`bash bench/gpu_check.sh` on a bare one (it also records a loop's GPU memory per stage).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.stages import loop, rundir
from kd.stages.engines import SamplingParams
from kd.stages.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: sleep and wake move GPU memory, which CPU runs do not have")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM with CUDA: pip install -e '.[vllm]'")
# bfloat16: vLLM's GPU attention kernels take no float32; eager: no CUDA graphs to capture for a toy
VLLM = {"kind": "vllm", "dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True}


def engine_settings(section: str, **settings) -> dict:
    return {f"{section}.engine.{name}": value for name, value in settings.items()}


def random_adapter(student: str, out: Path) -> Path:
    """A LoRA adapter of the student with random A and B (not PEFT's no-op start), so that it shows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(out)
    return out


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def devices(model) -> set[str]:
    return {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}


def used_gib(index: int) -> float:
    """Memory in use on GPU `index` by every process (vLLM's engine runs in its own)."""
    free, total = torch.cuda.mem_get_info(index)
    return (total - free) / 2**30


def total_gib(index: int) -> float:
    return torch.cuda.get_device_properties(index).total_memory / 2**30


def test_hf_engines_sleep_in_cpu_memory_and_wake_to_the_same_results(make_config, tmp_path):
    config = make_config(**engine_settings("generate", device="cuda"), **engine_settings("score", device="cuda"))
    adapter = random_adapter(config.student, tmp_path / "adapter")
    greedy = SamplingParams(16, greedy=True)
    with Session(config, progress=False) as session:
        prompts = [p.token_ids for p in session.prompts(config.generate.prompts, config.generate.max_new_tokens)[:4]]
        seeds = list(range(len(prompts)))
        student = session.engine("student", config.generate.engine)
        sampled = student.sample(prompts, seeds, greedy, adapter)
        teacher = session.engine("teacher", config.score.engine)  # one awake at a time: the student sleeps
        assert devices(student.base) == {"cpu"} and devices(teacher.base) == {"cuda"}
        sequences = [p + c.token_ids for p, c in zip(prompts, sampled)]
        scored = teacher.score(sequences, [len(p) for p in prompts])

        allocated = torch.cuda.memory_allocated()
        session.sleep_engines()  # as before train
        assert devices(teacher.base) == {"cpu"}
        assert torch.cuda.memory_allocated() <= allocated - tensor_bytes(teacher.base)

        assert session.engine("student", config.generate.engine) is student
        assert devices(student.base) == {"cuda"}
        again = student.sample(prompts, seeds, greedy, adapter)  # the adapter came back with the model
        assert [c.token_ids for c in again] == [c.token_ids for c in sampled]
        for a, b in zip(again, sampled):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        rescored = session.engine("teacher", config.score.engine).score(sequences, [len(p) for p in prompts])
        for a, b in zip(rescored, scored):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_sleeps_off_its_gpu_and_wakes_with_its_adapter(make_config, tmp_path):
    """Sleep mode level 1 gives back the weights and the KV cache of gpu_memory_utilization 0.5 of the
    GPU it was put on (the last one: cuda:N placement where there are several) and wakes to the same
    greedy samples with the same LoRA adapter."""
    index = torch.cuda.device_count() - 1
    config = make_config(**engine_settings("generate", **VLLM, device=f"cuda:{index}", gpu_memory_utilization=0.5))
    adapter = random_adapter(config.student, tmp_path / "adapter")
    greedy = SamplingParams(16, greedy=True)
    with Session(config, progress=False) as session:
        prompts = [p.token_ids for p in session.prompts(config.generate.prompts, config.generate.max_new_tokens)[:4]]
        seeds = list(range(len(prompts)))
        engine = session.engine("student", config.generate.engine)
        sampled = engine.sample(prompts, seeds, greedy, adapter)
        awake = used_gib(index)
        session.sleep_engines()
        asleep = used_gib(index)
        assert awake - asleep > 0.3 * total_gib(index), (awake, asleep)
        again = session.engine("student", config.generate.engine).sample(prompts, seeds, greedy, adapter)
        assert used_gib(index) - asleep > 0.3 * total_gib(index)
        assert [c.token_ids for c in again] == [c.token_ids for c in sampled]
        for a, b in zip(again, sampled):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-2)


@pytest.mark.vllm
@needs_vllm
def test_loop_trains_while_vllm_engines_at_nine_tenths_of_the_gpu_sleep(make_config, caplog):
    """The toy loop with in-process vLLM for generate and score, both at the default 0.9 of the GPU,
    and training on the same GPU: possible only because each engine sleeps while the others run.
    The stage records show it: the student engine's 0.9 is in use at generate's end, neither engine's
    at train's end."""
    if rundir.gpu_used_gib() is None:
        pytest.skip("needs nvidia-ml-py: the stage records' gpu_used_gib comes from NVML")
    caplog.set_level(logging.INFO, logger="kd.stages")
    config = make_config(epochs=1, **{"score.self_check": 0}, **engine_settings("generate", **VLLM, device="auto"),
                         **engine_settings("score", **VLLM, device="auto"))
    loop.run(config)
    records = {(r["epoch"], r["stage"]): r for r in rundir.read_metrics(config.run_dir) if "wall_seconds" in r}
    total = total_gib(0)
    assert records[(0, "generate")]["gpu_used_gib"] > 0.6 * total, records
    assert records[(0, "score")]["gpu_used_gib"] > 0.6 * total, records
    assert records[(0, "train")]["gpu_used_gib"] < 0.25 * total, records
    assert records[(0, "train")]["peak_gpu_gib"] > 0, records  # the student trained on the GPU
    assert np.isfinite(records[(1, "eval")]["heldout_reverse_kl"])
    lines = [record.getMessage() for record in caplog.records if record.name.startswith("kd.stages")]
    train = lines.index("epoch 0: train")
    assert lines[train + 1].startswith("sleep teacher (vllm)"), lines
    # The trained student leaves the GPU before the student's engine wakes for the next eval.
    offloaded = next(i for i, line in enumerate(lines) if line.startswith("policy to CPU"))
    assert train < offloaded < next(i for i, line in enumerate(lines) if i > train and line.startswith("wake student")), lines
