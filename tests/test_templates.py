"""Each model sees a chat prompt in its own template; generation stops at every end-of-turn id.

The tiny toy world's teacher is given a second template that, like Qwen3-32B's hybrid one with
`enable_thinking=False`, inserts an empty think block after the assistant header; the student keeps
plain ChatML. Same vocabulary, two formats.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kd.stages import datasets_io, evaluate as eval_stage, generate, pipeline, rundir, score
from kd.stages.errors import KdError
from kd.stages.schemas import EVAL, ROLLOUTS, SCORED
from kd.stages.session import Session, stop_token_ids

THINK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture
def think_teacher(tiny_world, tmp_path):
    """The tiny teacher with the hybrid template above (its weights and vocabulary unchanged)."""
    teacher = tmp_path / "think-teacher"
    shutil.copytree(tiny_world / "teacher", teacher)
    config_path = teacher / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    settings["chat_template"] = THINK_TEMPLATE
    config_path.write_text(json.dumps(settings))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    return teacher


def independent_teacher_logprobs(teacher_dir, prompt_ids, completion_ids) -> np.ndarray:
    """log p_teacher(y_t | teacher's prompt, y_<t) with plain transformers, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, positions + 1]].numpy()


def test_teacher_scores_its_own_rendering_of_the_chat(make_config, think_teacher, tiny_world):
    from transformers import AutoTokenizer

    config = make_config(**{"teacher": str(think_teacher), "score.chat_template_kwargs.enable_thinking": False,
                            "generate.prompts_per_epoch": 3})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        scored_dir = score.run(config, 0, session)
    table = datasets_io.read_table(scored_dir, SCORED)
    rollouts = datasets_io.read_table(pipeline.stage_dir(config, 0, "rollouts"), ROLLOUTS)
    student_tok = AutoTokenizer.from_pretrained(str(tiny_world / "student"))
    teacher_tok = AutoTokenizer.from_pretrained(str(think_teacher))
    think_ids = student_tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    for row, before in zip(table.to_pylist(), rollouts.to_pylist()):
        messages = json.loads(row["prompt_messages"])
        student_ids = student_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        teacher_ids = teacher_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False,
                                                      enable_thinking=False)
        # the student side is unchanged: its own rendering, its own samples
        assert row["prompt_token_ids"] == before["prompt_token_ids"] == student_ids
        assert row["completion_token_ids"] == before["completion_token_ids"]
        # the teacher's prompt is its own template's, with the empty think block
        assert row["teacher_prompt_token_ids"] == teacher_ids == student_ids + think_ids
        expected = independent_teacher_logprobs(think_teacher, teacher_ids, row["completion_token_ids"])
        np.testing.assert_allclose(row["teacher_logprobs"], expected, atol=1e-5)
    # scored on the student's rendering instead, the numbers would differ: the test can fail
    first = table.slice(0, 1).to_pylist()[0]
    wrong = independent_teacher_logprobs(think_teacher, first["prompt_token_ids"], first["completion_token_ids"])
    assert np.abs(wrong - np.asarray(first["teacher_logprobs"])).max() > 1e-3
    probe = datasets_io.read_manifest(scored_dir)["stats"]["template_probe"]
    assert probe["teacher"] == probe["student"] + "<think>\n\n</think>\n\n"

    # eval renders the teacher's prompt the same way
    with Session(config, progress=False) as session:
        eval_dir = eval_stage.run(config, 0, session)
    for row in datasets_io.read_table(eval_dir, EVAL).to_pylist():
        assert row["teacher_prompt_token_ids"] == row["prompt_token_ids"] + think_ids


def test_plain_prompts_reach_both_models_as_the_same_ids(make_config, think_teacher, tmp_path):
    prompts = tmp_path / "plain.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"{i}+{i}"}) + "\n" for i in range(4)))
    config = make_config(**{"teacher": str(think_teacher), "generate.prompts": str(prompts),
                            "score.chat_template_kwargs.enable_thinking": False})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        scored_dir = score.run(config, 0, session)
    table = datasets_io.read_table(scored_dir, SCORED)
    assert table.column("prompt_messages").null_count == len(table)
    assert table.column("teacher_prompt_token_ids").to_pylist() == table.column("prompt_token_ids").to_pylist()
    assert datasets_io.read_manifest(scored_dir)["stats"]["template_probe"] is None


def test_a_vocabulary_mismatch_is_refused_naming_an_id(make_config, tiny_world, tmp_path):
    from transformers import AutoTokenizer

    teacher = tmp_path / "swapped"
    shutil.copytree(tiny_world / "teacher", teacher)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "5", "7"  # two single-digit tokens swap ids: same token set, different ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert AutoTokenizer.from_pretrained(str(teacher)).get_vocab()[a] == vocab[a]
    config = make_config(teacher=str(teacher))
    rundir.prepare(config)
    # refused before anything is sampled: generate renders each prompt in the teacher's template too
    with Session(config, progress=False) as session:
        with pytest.raises(KdError, match=r"2 student ids differ, e\.g\. id \d+ is '[57]' for the student and '[57]'"):
            generate.run(config, 0, session)
    assert not pipeline.stage_dir(config, 0, "rollouts").exists()


def test_generation_stops_at_every_end_of_turn_id(make_config, tiny_world, tmp_path):
    """A student whose generation_config lists two end ids (as Qwen's and Llama 3's instruct models do)
    stops at either: here <|im_end|> and ',' (which every worked sum writes early)."""
    from transformers import AutoTokenizer, GenerationConfig

    student = tmp_path / "two-eos-student"
    shutil.copytree(tiny_world / "student", student)
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    comma = tokenizer.convert_tokens_to_ids(",")
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, comma]).save_pretrained(str(student))
    assert stop_token_ids(tokenizer, str(student)) == sorted({tokenizer.eos_token_id, comma})

    config = make_config(student=str(student))
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        table = datasets_io.read_table(generate.run(config, 0, session), ROLLOUTS)
    ends = [ids[-1] for ids, reason in zip(table.column("completion_token_ids").to_pylist(),
                                            table.column("finish_reason").to_pylist()) if reason == "stop"]
    assert comma in ends and len(ends) == len(table)
    for ids in table.column("completion_token_ids").to_pylist():
        assert comma not in ids[:-1] and tokenizer.eos_token_id not in ids[:-1]


def test_missing_generation_config_falls_back_to_the_tokenizer_eos(tiny_world, tmp_path):
    from transformers import AutoTokenizer

    student = tmp_path / "bare"
    shutil.copytree(tiny_world / "student", student)
    (student / "generation_config.json").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    assert stop_token_ids(tokenizer, str(student)) == [tokenizer.eos_token_id]
