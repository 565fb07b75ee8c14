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

from kd.stages import datasets_io, evaluate as eval_stage, generate, pipeline, prompts as prompts_lib, rundir, score
from kd.stages.errors import KdError
from kd.stages.schemas import EVAL, ROLLOUTS, SCORED
from kd.stages.session import Session, stop_token_ids

THINK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def with_template(model_dir, copy_dir, template: str):
    """A copy of `model_dir` at `copy_dir` whose tokenizer has chat template `template` (weights and
    vocabulary unchanged)."""
    shutil.copytree(model_dir, copy_dir)
    config_path = copy_dir / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    settings["chat_template"] = template
    config_path.write_text(json.dumps(settings))
    (copy_dir / "chat_template.jinja").unlink(missing_ok=True)
    return copy_dir


@pytest.fixture
def think_teacher(tiny_world, tmp_path):
    """The tiny teacher with the hybrid template above."""
    return with_template(tiny_world / "teacher", tmp_path / "think-teacher", THINK_TEMPLATE)


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


# Qwen3-4B-Thinking-2507's generation prompt: the reasoning block is opened for the model.
THINKING_STUDENT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture
def thinking_student(tiny_world, tmp_path):
    """The tiny student with a thinking model's template."""
    return with_template(tiny_world / "student", tmp_path / "thinking-student", THINKING_STUDENT_TEMPLATE)


@pytest.mark.parametrize("thinking, prefix, expected", [
    (True, "", "<think>\n"),           # the opening the teacher lacks: warned, naming it
    (True, "<think>\n", "<think>\n"),   # set: the teacher's prompt is the student's
    (True, "<think>", "<think>\n"),     # set wrong
    (False, "<think>\n", ""),          # set for a student whose prompt holds no opening: <think> twice
])
def test_a_thinking_students_opening_reaches_the_teacher_through_assistant_prefix(
        make_config, tiny_world, thinking_student, think_teacher, thinking, prefix, expected, capsys):
    """A thinking student (generation prompt ends in an opened `<think>`) scored by a hybrid teacher in
    thinking mode (generation prompt ends at the header): the teacher's prompt is its own rendering
    followed by score.assistant_prefix, tokenized as one text, and scored as such; kd warns, naming
    the value to set, unless the two generation prompts then end alike, and `kd inspect` says so too."""
    from transformers import AutoTokenizer

    from kd.stages import inspection

    student = thinking_student if thinking else tiny_world / "student"
    config = make_config(**{"student": str(student), "teacher": str(think_teacher),
                            "score.assistant_prefix": json.dumps(prefix), "generate.prompts_per_epoch": 3})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        scored_dir = score.run(config, 0, session)
    warned = capsys.readouterr().err
    teacher_tok = AutoTokenizer.from_pretrained(str(think_teacher))
    for row in datasets_io.read_table(scored_dir, SCORED).to_pylist():
        rendered = teacher_tok.apply_chat_template(json.loads(row["prompt_messages"]), add_generation_prompt=True,
                                                   tokenize=False)
        assert row["teacher_prompt_token_ids"] == teacher_tok.encode(rendered + prefix, add_special_tokens=False)
        assert (row["teacher_prompt_token_ids"] == row["prompt_token_ids"]) == (thinking and prefix == expected)
        expected_logprobs = independent_teacher_logprobs(think_teacher, row["teacher_prompt_token_ids"],
                                                         row["completion_token_ids"])
        np.testing.assert_allclose(row["teacher_logprobs"], expected_logprobs, atol=1e-5)
    probe = datasets_io.read_manifest(scored_dir)["stats"]["template_probe"]
    assert probe["teacher"].endswith("<|im_start|>assistant\n" + prefix)
    assert probe["prefix_check"] == {"student": "<|im_start|>assistant\n" + ("<think>\n" if thinking else ""),
                                     "teacher": "<|im_start|>assistant\n", "assistant_prefix": prefix,
                                     "expected": expected, "field": "score.assistant_prefix"}
    inspection.run(scored_dir)
    shown = capsys.readouterr().err  # kd's console writes to stderr
    if prefix == expected:
        assert "warning" not in warned and "warning" not in shown
    else:
        advice = f"set score.assistant_prefix: {json.dumps(expected)} (in YAML; --set 'score.assistant_prefix={json.dumps(expected)}')"
        assert warned.count("kd: warning:") == 1 and advice in warned  # once, though every prompt is rendered
        assert "warning:" in shown and advice in shown


def test_each_teacher_has_its_own_assistant_prefix(make_config, thinking_student, think_teacher, capsys):
    """A routed teacher's prefix is its own (score.teachers.<name>.assistant_prefix), and the warning
    names that field."""
    config = make_config(**{"student": str(thinking_student), "teacher": str(think_teacher),
                            "score.assistant_prefix": json.dumps("<think>\n"), "score.route_by": "domain",
                            "score.teachers": json.dumps({"other": {"model": str(think_teacher)}})})
    messages = json.dumps([{"role": "user", "content": "1+2"}])
    with Session(config, progress=False) as session:
        student_ids = prompts_lib.render(json.loads(messages), session.tokenizer, {})
        assert session.teacher_prompt_ids(student_ids, messages) == student_ids
        assert capsys.readouterr().err == ""
        other = session.teacher_prompt_ids(student_ids, messages, "other")
    assert other != student_ids
    assert "set score.teachers.other.assistant_prefix: \"<think>\\n\"" in capsys.readouterr().err


def test_a_teacher_prompt_that_holds_more_than_the_students_is_not_warned_about(make_config, think_teacher, capsys):
    """A non-thinking student against the hybrid teacher with enable_thinking false: the teacher's
    empty think block is its own format, not an opening the student's prompt holds."""
    config = make_config(**{"teacher": str(think_teacher), "score.chat_template_kwargs.enable_thinking": False})
    with Session(config, progress=False) as session:
        prompts = session.prompts(config.generate.prompts, config.generate.max_new_tokens, "generate.max_new_tokens")
        check = session.prefix_check(prompts[0].messages)
    assert (check["expected"], check["teacher"]) == ("", "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "warning" not in capsys.readouterr().err


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
