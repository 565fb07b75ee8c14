"""export-lora: the epoch's adapter, where the next generate and vLLM / SGLang load it.

    kd export-lora --run toy --epoch 3 [--merge]

Writes <epoch>/adapter/ in the PEFT format (adapter_config.json, adapter_model.safetensors) that
vLLM's LoRARequest(name, id, path) and SGLang's --lora-paths load, with base_model_name_or_path
pointing at the student. --merge also writes merged/: full weights (base + LoRA) in the student's
own dtype (bfloat16 for a bfloat16 checkpoint) with the tokenizer, loadable by any engine as a
plain model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from kd.stages import datasets_io, pipeline, rundir
from kd.stages.config import Config
from kd.stages.schemas import ADAPTER, TRAIN_STEPS
from kd.stages.session import Session

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def run(config: Config, epoch: int, session: Session | None = None, merge: bool = False) -> Path:
    """Write <epoch>/adapter; `session` is the pipeline's common argument, unused: copying needs no model."""
    out = pipeline.stage_dir(config, epoch, "adapter")
    if datasets_io.is_complete(out) and (not merge or (out / "merged").is_dir()):
        return out
    datasets_io.fault_point(out, "start")
    started = time.time()
    source = pipeline.stage_dir(config, epoch, "train")
    datasets_io.require(source, TRAIN_STEPS, f"run `kd train --epoch {epoch}` first")

    def write_files(tmp: Path) -> None:
        for name in ADAPTER_FILES:
            shutil.copy2(source / "adapter" / name, tmp / name)
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = config.student
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        if merge:
            write_merged(config.student, tmp, tmp / "merged")

    stats = {"merged": merge, "bytes": (source / "adapter" / "adapter_model.safetensors").stat().st_size}
    stage_config = {"student": config.student, "merge": merge}
    datasets_io.write_dataset(out, ADAPTER, None, stage_config, [source], stats, started, write_files)
    rundir.log_metrics(config, {"epoch": epoch, "stage": pipeline.EXPORT_LORA.command, "wall_seconds": time.time() - started, **stats})
    return out


def write_merged(student: str, adapter: Path, target: Path) -> None:
    """base + LoRA as full weights, in the base's own dtypes: each tensor as transformers loads the
    student with dtype="auto" (its config.json dtype / torch_dtype, modules it keeps in float32 kept
    so). The merge itself is done in float32 and rounded once to that dtype, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.stages.models import load_adapter

    base = AutoModelForCausalLM.from_pretrained(student, dtype="auto")
    dtypes = {name: tensor.dtype for name, tensor in base.state_dict().items()}
    merged = load_adapter(base.float(), adapter).merge_and_unload()
    with torch.no_grad():
        for name, tensor in merged.state_dict(keep_vars=True).items():
            if name in dtypes and tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(student).save_pretrained(target)
