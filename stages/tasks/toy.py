"""The toy world: a task, a tokenizer, a teacher and a weaker student, built offline from a seed.

    kd toy                     # builds runs/toy-world (skipped when it is already there)

Task: 3-digit addition written digit by digit with carries, which a 4-layer 128-wide model learns
in a few hundred steps where the bare answer ("347+268 = 615") stays below 10% accuracy:

    user: 347+268      assistant: 7+8+0=15,4+6+1=11,3+2+1=6 so 615

Tokenizer: byte-level BPE trained here with `tokenizers` (digits kept single), wrapped as a
transformers tokenizer with a ChatML template. Models: Qwen3ForCausalLM, so that transformers, vLLM
and SGLang all load them. The teacher is SFT-trained on 3-digit sums until it is good at them. The
student is shallower and was taught mostly 2-digit sums (a fraction `student_three_digit_fraction`
of its SFT examples are 3-digit): it knows the written method but is unreliable on 3-digit sums,
which is where distillation from the teacher, on the student's own attempts, has to take it.
(A student that is merely under-trained on 3-digit sums learns far more slowly from sampled-token
feedback: its errors are everywhere, not in one skill; see the closing notes of the issue.)

The SFT here is a plain loop on purpose: it makes fixtures, and is not the product's train stage.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kd.stages import datasets_io
from kd.stages.config import ToyConfig
from kd.stages.engines import SamplingParams
from kd.stages.engines.hf import HFEngine
from kd.stages.tasks.answers import last_integer
from kd.stages.progress import bar

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def worked_sum(a: int, b: int) -> str:
    """'7+8+0=15,4+6+1=11,3+2+1=6 so 615' for 347+268: one column per step, carry made explicit."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ",".join(steps) + f" so {a + b}"


def problems(
    seed: int, count: int, exclude: set[str] = frozenset(), digits: int = 3, distinct: bool = True
) -> list[tuple[str, str, str]]:
    """(prompt, completion, answer) for `count` sums of two `digits`-digit numbers not in `exclude`."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    low, high = 10 ** (digits - 1), 10**digits - 1
    while len(out) < count:
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = f"{a}+{b}"
        if prompt in seen:
            continue
        if distinct:
            seen.add(prompt)
        out.append((prompt, worked_sum(a, b), str(a + b)))
    return out


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=256,
    )


def qwen3(tokenizer, layers: int, width: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
        # head_dim 32: vLLM's CPU attention kernels support no smaller head size
        num_attention_heads=width // 32, num_key_value_heads=max(1, width // 64), head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def sft(model, tokenizer, examples, steps: int, lr: float, batch_size: int, seed: int,
        description: str = "SFT", stop_when=None, check_every: int = 25) -> int:
    """Plain SFT on completion tokens only (prompt tokens masked); AdamW, warmup then cosine.

    `stop_when(model)` is asked every `check_every` steps; training stops once it says True.
    Returns the number of steps taken.
    """
    encoded = [
        (prompt_ids(tokenizer, p), tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id])
        for p, c, _ in examples
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    model.train()
    step = 0
    with bar(description, steps) as advance:
        for step in range(1, steps + 1):
            _sft_step(model, tokenizer, rng.sample(encoded, batch_size), optimizer, schedule)
            advance(1)
            if stop_when is not None and step % check_every == 0:
                model.eval()
                if stop_when(model):
                    break
                model.train()
    model.eval()
    return step


def _sft_step(model, tokenizer, batch, optimizer, schedule) -> None:
    batch_size = len(batch)
    longest = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((batch_size, longest), tokenizer.pad_token_id)
    labels = torch.full((batch_size, longest), -100)
    mask = torch.zeros((batch_size, longest), dtype=torch.long)
    for r, (p, c) in enumerate(batch):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[r, : len(p) + len(c)] = 1
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def greedy_accuracy(model, tokenizer, examples, max_new_tokens: int = 48) -> float:
    engine = HFEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    prompts = [prompt_ids(tokenizer, p) for p, _, _ in examples]
    outs = engine.sample(prompts, [0] * len(prompts), SamplingParams(max_new_tokens, greedy=True), adapter=None)
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    return sum(last_integer(texts, [a for _, _, a in examples])) / len(examples)


def write_prompts(path: Path, examples) -> None:
    rows = [
        {"id": f"{path.stem.split('.')[0]}-{i:05d}", "messages": [{"role": "user", "content": p}], "answer": a}
        for i, (p, _, a) in enumerate(examples)
    ]
    datasets_io.write_jsonl_zst(path, rows)


def build(config: ToyConfig, out_dir: Path, log=print) -> dict:
    """Build the toy world into `out_dir` atomically; returns the report written to toy.json."""
    report = datasets_io.built_world(out_dir / "toy.json", asdict(config), "toy world", "toy_dir")
    if report is not None:
        return report
    start = time.perf_counter()
    heldout = problems(config.seed + 1, config.heldout_prompts)
    held = {p for p, _, _ in heldout}
    validation = problems(config.seed + 5, 64, exclude=held)
    held |= {p for p, _, _ in validation}
    train = problems(config.seed + 2, config.train_prompts, exclude=held)
    sft_data = problems(config.seed + 3, 20000, exclude=held)
    three_digit = int(len(sft_data) * config.student_three_digit_fraction)
    student_data = sft_data[:three_digit] + problems(config.seed + 4, len(sft_data) - three_digit, digits=2, distinct=False)
    with datasets_io.staging_dir(out_dir) as tmp:
        tokenizer = build_tokenizer(
            [tokenizer_text(p, c) for p, c, _ in sft_data[:5000]], config.vocab_size
        )
        report = {"config": asdict(config), "vocab_size": len(tokenizer)}
        def weak_enough(model) -> bool:
            return greedy_accuracy(model, tokenizer, validation) >= config.student_stop_accuracy

        for role, layers, max_steps, data, stop_when in (
            ("teacher", config.teacher_layers, config.teacher_steps, sft_data, None),
            ("student", config.student_layers, config.student_steps, student_data, weak_enough),
        ):
            t0 = time.perf_counter()
            model = qwen3(tokenizer, layers, config.width, config.seed)
            steps = sft(
                model, tokenizer, data, max_steps, config.sft_lr, config.sft_batch_size, config.seed,
                f"toy {role} SFT", stop_when,
            )
            model.save_pretrained(tmp / role)
            tokenizer.save_pretrained(tmp / role)
            accuracy = greedy_accuracy(model, tokenizer, heldout)
            report[role] = {
                "layers": layers, "width": config.width, "sft_steps": steps,
                "parameters": sum(p.numel() for p in model.parameters()),
                "heldout_greedy_accuracy": accuracy, "build_seconds": round(time.perf_counter() - t0, 1),
            }
            log(f"toy {role}: {layers} layers, {steps} SFT steps, held-out greedy accuracy {accuracy:.1%}")
        (tmp / "prompts").mkdir()
        write_prompts(tmp / "prompts" / "train.jsonl.zst", train)
        write_prompts(tmp / "prompts" / "heldout.jsonl.zst", heldout)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "toy.json").write_text(json.dumps(report, indent=2))
    return report


def tokenizer_text(prompt: str, completion: str) -> str:
    return f"user\n{prompt}\nassistant\n{completion}\n"
