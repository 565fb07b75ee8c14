"""`kd export-lora --merge`: the merged model is written in the student's own dtype, and its weights
are base + LoRA delta (scaling x B @ A), rounded once to that dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd.stages.export_lora import write_merged

TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8


def student_in(dtype: torch.dtype, world: Path, folder: Path) -> Path:
    """The tiny world's student saved in `dtype` (config.json says so), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    source = world / "student"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(dtype)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    return folder


def random_adapter(student: Path, folder: Path) -> dict[str, torch.Tensor]:
    """A LoRA over `student` whose A and B are both random (a fresh one has B = 0); its tensors by name."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    lora.save_pretrained(folder)
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_merged_export_keeps_the_students_dtype_and_is_base_plus_delta(tiny_world, tmp_path, dtype):
    from safetensors.torch import load_file

    student = student_in(dtype, tiny_world, tmp_path / "student")
    lora = random_adapter(student, tmp_path / "adapter")
    write_merged(str(student), tmp_path / "adapter", tmp_path / "merged")

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    base, merged = load_file(str(student / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(base)
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {dtype}
    changed = 0
    for name, weight in merged.items():
        module = name.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(weight, base[name]), name  # not a LoRA target: the base, bit for bit
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        expected = base[name].float() + (ALPHA / RANK) * (b.float() @ a.float())
        if dtype == torch.float32:
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
        else:  # one rounding of the float32 sum to bfloat16 (8 bits of mantissa)
            torch.testing.assert_close(weight.float(), expected, rtol=2**-8, atol=1e-6)
            assert not torch.equal(weight, base[name]), name  # the delta shows in bfloat16
        changed += 1
    assert changed == 2 * len({n.split(".self_attn")[0] for n in merged if ".self_attn." in n})  # q and v of each layer
