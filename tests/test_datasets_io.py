"""Dataset I/O: atomic directories, manifests, declared schemas, prompt files (tier 1, real files)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.stages import datasets_io, prompts
from kd.stages.errors import KdError
from kd.stages.schemas import ROLLOUTS, SCORED, TRAIN_STEPS


def rollout_table(rows: int = 3) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "prompt_id": f"p{i}", "sample_index": 0, "prompt_token_ids": [1, 2], "completion_token_ids": [3, 4],
                "sampler_logprobs": [-0.5, -0.25], "finish_reason": "stop", "completion_text": "x",
                "policy_version": 0, "answer": None, "teacher": "default",
            }
            for i in range(rows)
        ],
        schema=ROLLOUTS.schema,
    )


def test_write_dataset_is_atomic_and_described(tmp_path):
    out = tmp_path / "0000" / "rollouts"
    manifest = datasets_io.write_dataset(out, ROLLOUTS, rollout_table(), {"a": 1}, [], {"n": 3}, started=0.0)
    assert manifest["rows"] == 3 and manifest["files"][0]["path"] == "part-00000-of-00001.arrow"
    assert datasets_io.read_table(out, ROLLOUTS).num_rows == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["rollouts"]  # no staging left behind


def test_a_failed_stage_leaves_nothing(tmp_path):
    out = tmp_path / "rollouts"

    def fail(tmp):
        (tmp / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        datasets_io.write_dataset(out, ROLLOUTS, rollout_table(), {}, [], {}, 0.0, write_files=fail)
    assert list(tmp_path.iterdir()) == []
    assert not datasets_io.is_complete(out)


def test_a_terminated_process_publishes_nothing_even_when_its_exit_was_swallowed(tmp_path):
    # kd's SIGTERM handler raises SystemExit, which Python only prints when the signal lands inside a
    # finaliser; the process then works on, and every commit point must stop it.
    from kd.stages import shards

    datasets_io.TERMINATED.set()
    try:
        with pytest.raises(SystemExit) as exited:
            datasets_io.write_dataset(tmp_path / "rollouts", ROLLOUTS, rollout_table(), {}, [], {}, 0.0)
        assert exited.value.code == 143
        with pytest.raises(SystemExit):
            shards.write_part(tmp_path / "sharded", ROLLOUTS, rollout_table(), 1, 2, wall_seconds=1.0)
    finally:
        datasets_io.TERMINATED.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()] == []
    datasets_io.write_dataset(tmp_path / "rollouts", ROLLOUTS, rollout_table(), {}, [], {}, 0.0)
    assert datasets_io.is_complete(tmp_path / "rollouts")


def test_a_directory_without_manifest_does_not_exist_and_is_replaced(tmp_path):
    out = tmp_path / "rollouts"
    out.mkdir()
    (out / "part-00000-of-00001.arrow").write_text("garbage from an older, killed kd")
    with pytest.raises(KdError, match="no complete rollouts dataset"):
        datasets_io.read_table(out, ROLLOUTS, "run generate")
    datasets_io.write_dataset(out, ROLLOUTS, rollout_table(2), {}, [], {}, 0.0)
    assert datasets_io.read_table(out, ROLLOUTS).num_rows == 2


def test_readers_refuse_another_kind_or_version(tmp_path):
    out = tmp_path / "rollouts"
    datasets_io.write_dataset(out, ROLLOUTS, rollout_table(), {}, [], {}, 0.0)
    with pytest.raises(KdError, match="holds a rollouts dataset, expected scored"):
        datasets_io.read_table(out, SCORED)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdError, match="schema version 0"):
        datasets_io.read_table(out, ROLLOUTS)


def test_schema_is_declared_not_inferred(tmp_path):
    out = tmp_path / "train"
    table = pa.table({"step": [1], "global_step": [1], "loss": [0.5]})  # int64 / double, missing columns
    with pytest.raises((pa.ArrowInvalid, ValueError, KeyError)):
        datasets_io.write_dataset(out, TRAIN_STEPS, table, {}, [], {}, 0.0)
    assert not out.exists()


class CharTokenizer:
    """Enough of a tokenizer for prompt loading: one id per character."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


ROWS = [
    {"id": "a", "prompt": "1+1", "answer": "2"},
    {"messages": [{"role": "user", "content": "2+2"}], "answer": 4},
]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.zst", "parquet", "datasets"])
def test_prompt_files_in_every_format(tmp_path, suffix):
    path = tmp_path / f"prompts.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == "jsonl.zst":
        datasets_io.write_jsonl_zst(path, ROWS)
    elif suffix == "parquet":
        pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "1+1", "answer": "2"}, {"id": "b", "prompt": "2+2", "answer": "4"}]), path)
    else:
        from datasets import Dataset

        Dataset.from_list([{"id": "a", "prompt": "1+1", "answer": "2"}, {"id": "b", "prompt": "2+2", "answer": "4"}]).save_to_disk(str(path))
    loaded = prompts.load(path, CharTokenizer(), max_prompt_tokens=100)
    assert [p.answer for p in loaded] == ["2", "4"] and loaded[0].id == "a"
    assert loaded[0].token_ids == [ord(c) for c in "1+1"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no prompts in the file"),
        (b'{"prompt": "1+1"}\n{"prompt": \n', ":2: invalid JSON"),
        (b'{"text": "1+1"}\n', ":1: missing field"),
        (b'{"prompt": 7}\n', ":1: field prompt: expected a string"),
        (b'{"prompt": "  "}\n', ":1: field prompt: empty"),
        (b'{"messages": "hi"}\n', ":1: field messages"),
        (b'{"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}\n',
         ":1: field messages: the last message is the assistant's answer"),
        (b'{"prompt": "1+1", "answer": [2]}\n', ":1: field answer"),
        (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', ":2: field id: '1' appears twice"),
        (b'{"prompt": "' + b"9" * 200 + b'"}\n', ":1: prompt is 200 tokens"),
        (b'{"prompt": "\xff\xfe"}\n', "is not UTF-8"),
        (b"[1, 2]\n", ":1: expected a JSON object"),
    ],
)
def test_bad_prompt_rows_are_refused_by_file_row_and_field(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(KdError) as err:
        prompts.load(path, CharTokenizer(), max_prompt_tokens=100)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_truncated_prompt_files(tmp_path):
    with pytest.raises(KdError, match="prompt file not found"):
        prompts.load(tmp_path / "nope.jsonl", CharTokenizer(), 100)
    path = tmp_path / "p.jsonl.zst"
    datasets_io.write_jsonl_zst(path, ROWS * 50)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(KdError, match="not a complete zstandard file"):
        prompts.load(path, CharTokenizer(), 100)


def test_the_data_layer_and_the_config_import_without_torch():
    """`kd status`, `kd verify`, `kd slurm` and dataset inspection work where torch is heavy or absent:
    the pipeline table, run layout, locks, schemas, datasets, shards, prompts and config never import it."""
    import subprocess
    import sys

    modules = "pipeline rundir locks schemas datasets_io shards prompts config status verify slurm".split()
    code = "import sys\n" + "".join(f"import kd.stages.{m}\n" for m in modules) + "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
