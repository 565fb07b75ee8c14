"""The bad-input catalogue: each case runs the real `kd` CLI (in-process) on a real run and must end
with a one-line error naming the file, row or field and the fix, a non-zero exit, and runs/ exactly
as it was before. `just bad-inputs` rewrites docs/bad-inputs.md: every case with the message kd gave."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from kd.stages import datasets_io, export_lora, generate, rundir, score, train
from kd.stages.schemas import SCORED
from kd.stages.session import Session
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def fresh(command: str, *more: str) -> list[str]:
    """A command that would start a new run (runs.yaml: the base run's config under another id)."""
    epoch = [] if command == "loop" else ["--epoch", "0"]
    return [command, "--config", "runs.yaml", *epoch, *more]


def prompts_case(content: bytes | str, name: str = "bad.jsonl"):
    return lambda tmp: fresh("generate", "--set", f"generate.prompts={write(tmp / name, content)}")


def truncated_zst(tmp: Path):
    path = tmp / "cut.jsonl.zst"
    datasets_io.write_jsonl_zst(path, [{"prompt": "1+1"}] * 200)
    path.write_bytes(path.read_bytes()[:-10])
    return fresh("generate", "--set", f"generate.prompts={path}")


def copy_run(tmp: Path, name: str) -> Path:
    target = tmp / "runs" / name
    shutil.copytree(tmp / "runs" / "base", target)
    save_config(target, {**yaml.safe_load((target / "config.yaml").read_text()), "run_id": name})
    return target


def save_config(run: Path, data: dict) -> None:
    """Written as kd writes it, so that kd finds nothing to rewrite."""
    from kd.stages import config as config_lib

    (run / "config.yaml").write_text(config_lib.to_yaml(config_lib.build(config_lib.Config, data, where="")))


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def corrupt_part(tmp: Path):
    run = copy_run(tmp, "corrupt")
    part = run / "0000" / "rollouts" / datasets_io.part_name(0, 1)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    shutil.rmtree(run / "0000" / "scored")
    return ["score", "--run", "corrupt", "--epoch", "0"]


def manifest_hash_mismatch(tmp: Path):
    run = copy_run(tmp, "hash")
    edit_manifest(run / "0000" / "scored", lambda m: m["files"][0].update(sha256="0" * 64))
    shutil.rmtree(run / "0000" / "train")
    return ["train", "--run", "hash", "--epoch", "0"]


def old_schema(tmp: Path):
    run = copy_run(tmp, "old")
    edit_manifest(run / "0000" / "scored", lambda m: m.update(schema_version=0))
    shutil.rmtree(run / "0000" / "train")
    return ["train", "--run", "old", "--epoch", "0"]


def nan_logprob(tmp: Path):
    run = copy_run(tmp, "nan")
    scored = run / "0000" / "scored"
    table = datasets_io.read_table(scored, SCORED)
    teacher = table.column("teacher_logprobs").to_pylist()
    teacher[3][1] = float("nan")
    table = table.set_column(table.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                             pa.array(teacher, type=pa.list_(pa.float32())))
    shutil.rmtree(scored)
    datasets_io.write_dataset(scored, SCORED, table, {}, [run / "0000" / "rollouts"], {}, 0.0)
    shutil.rmtree(run / "0000" / "train")
    return ["train", "--run", "nan", "--epoch", "0"]


def foreign_adapter(tmp: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    run = copy_run(tmp, "foreign")
    other = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=32))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp / "foreign")
    for name in export_lora.ADAPTER_FILES:
        shutil.copy(tmp / "foreign" / name, run / "0000" / "adapter" / name)
    return ["--no-verify", "generate", "--run", "foreign", "--epoch", "1"]


def other_tokenizer(tmp: Path):
    from kd.stages.tasks.toy import build_tokenizer

    run = copy_run(tmp, "vocab")
    config = yaml.safe_load((run / "config.yaml").read_text())
    teacher = tmp / "other-teacher"
    shutil.copytree(config["teacher"], teacher)
    build_tokenizer(["9+9=18 so 18", "another corpus entirely"], vocab_size=270).save_pretrained(teacher)
    save_config(run, {**config, "teacher": str(teacher)})
    shutil.rmtree(run / "0000" / "scored")
    return ["score", "--run", "vocab", "--epoch", "0"]


def narrow_teacher(tmp: Path):
    """The teacher with 8 rows fewer than the student's output head (its tokenizer unchanged): the
    student could sample ids it cannot score."""
    from transformers import AutoModelForCausalLM

    run = copy_run(tmp, "rows")
    config = yaml.safe_load((run / "config.yaml").read_text())
    teacher = tmp / "narrow-teacher"
    shutil.copytree(config["teacher"], teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.resize_token_embeddings(model.config.vocab_size - 8)
    model.save_pretrained(teacher)
    save_config(run, {**config, "teacher": str(teacher)})
    shutil.rmtree(run / "0000" / "scored")
    return ["score", "--run", "rows", "--epoch", "0"]


def bad_yaml(tmp: Path):
    return ["loop", "--config", str(write(tmp / "bad.yaml", "epochs: [1,\n"))]


def changed_config(tmp: Path):
    copy_run(tmp, "changed")
    return ["generate", "--run", "changed", "--epoch", "0", "--set", "train.learning_rate=0.5"]


def export_lora_while_held(run_name: str, lock_file: str):
    """`kd export-lora` on a copy of the base run while this test process holds `lock_file` of it
    (as another kd process would), until the case is over."""
    def case(tmp: Path):
        import fcntl

        run = copy_run(tmp, run_name)
        (run / lock_file).parent.mkdir(exist_ok=True)
        case.handle = open(run / lock_file, "w")
        fcntl.flock(case.handle, fcntl.LOCK_EX)
        shutil.rmtree(run / "0000" / "adapter")
        return ["export-lora", "--run", run_name, "--epoch", "0"]

    return case


def missing_shard(tmp: Path):
    """Rollouts as an array job left them with one of its two tasks never run."""
    from kd.stages import shards
    from kd.stages.schemas import ROLLOUTS

    run = copy_run(tmp, "halfdone")
    rollouts = run / "0000" / "rollouts"
    table = datasets_io.read_table(rollouts, ROLLOUTS)
    for stage in ("rollouts", "scored", "train", "adapter"):
        shutil.rmtree(run / "0000" / stage)
    rollouts.mkdir()
    shards.write_part(rollouts, ROLLOUTS, table.slice(0, 2), 0, 2, wall_seconds=1.0)
    return ["score", "--run", "halfdone", "--epoch", "0"]


def disk_full(tmp: Path):
    run = copy_run(tmp, "full")
    shutil.rmtree(run / "0000" / "adapter")
    disk_full.limit = 64 * 1024  # bytes per file: merged weights do not fit
    return ["export-lora", "--run", "full", "--epoch", "0", "--merge"]


def read_only_run(tmp: Path):
    """A run on a read-only file system (a read-only bind mount: root ignores permission bits)."""
    import subprocess

    run = copy_run(tmp, "readonly")
    shutil.rmtree(run / "0000" / "adapter")
    (run / ".lock").touch()
    mounted = subprocess.run(["mount", "--bind", str(run), str(run)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({mounted.stderr.decode().strip()}); needs root in a mount namespace")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(run)], check=True)
    read_only_run.cleanup = lambda: subprocess.run(["umount", str(run)], check=True)
    return ["export-lora", "--run", "readonly", "--epoch", "0"]


LONG_PROMPT = json.dumps({"prompt": "1" * 400}) + "\n"


def short_context_teacher(tmp: Path):
    """A teacher copy that attends to 48 positions: a toy prompt plus 40 new tokens does not fit it."""
    config = yaml.safe_load((tmp / "runs.yaml").read_text())
    teacher = tmp / "short-teacher"
    if not teacher.exists():
        shutil.copytree(config["teacher"], teacher)
        settings = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 48}))
    return fresh("generate", "--set", f"teacher={teacher}")


def wandb_not_installed(tmp: Path):
    """A run that reports to W&B where `import wandb` fails, as where it is not installed."""
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = None  # Python's own marker of a module that cannot be imported

    def restore() -> None:
        if saved is None:
            del sys.modules["wandb"]
        else:
            sys.modules["wandb"] = saved

    wandb_not_installed.cleanup = restore
    return fresh("generate", "--set", "report_to=[tensorboard, wandb]")


def routed_to_no_teacher(tmp: Path):
    """Two teachers routed by `domain`; a prompt names a third (refused before any model loads)."""
    prompts = write(tmp / "routed.jsonl", '{"prompt": "1+1"}\n{"prompt": "2+2", "domain": "math"}\n')
    return fresh("generate", "--set", f"generate.prompts={prompts}", "--set", "score.route_by=domain",
                 "--set", "score.teachers={code: {model: code-model}}")


CASES = [
    ("missing prompt file", lambda tmp: fresh("generate", "--set", f"generate.prompts={tmp}/none.jsonl"), "prompt file not found"),
    ("empty prompt file", prompts_case(""), "no prompts in the file"),
    ("invalid JSON on line 2", prompts_case('{"prompt": "1+1"}\n{"prompt": \n'), ":2: invalid JSON"),
    ("no prompt or messages", prompts_case('{"text": "1+1"}\n'), ":1: missing field"),
    ("prompt of the wrong type", prompts_case('{"prompt": 12}\n'), "field prompt: expected a string"),
    ("messages of the wrong type", prompts_case('{"messages": "1+1"}\n'), "field messages: expected a non-empty list"),
    ("message without content", prompts_case('{"messages": [{"role": "user"}]}\n'), "field messages"),
    ("empty prompt", prompts_case('{"prompt": ""}\n'), "field prompt: empty"),
    ("only empty messages", prompts_case('{"messages": [{"role": "user", "content": " "}]}\n'), "every message is empty"),
    ("answer of the wrong type", prompts_case('{"prompt": "1+1", "answer": [1, 2]}\n'), "field answer"),
    ("duplicate ids", prompts_case('{"id": "a", "prompt": "1"}\n{"id": "a", "prompt": "2"}\n'), "field id: 'a' appears twice"),
    ("row that is not an object", prompts_case("[1, 2]\n"), ":1: expected a JSON object"),
    ("prompt longer than the context", prompts_case(LONG_PROMPT), "more than the"),
    ("prompt past the teacher's context", short_context_teacher, "tokens in the teacher's template, more than the"),
    ("chat row that ends with the answer",
     prompts_case('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n'),
     "the last message is the assistant's answer"),
    ("LoRA dropout", lambda tmp: fresh("train", "--set", "train.lora_dropout=0.05"), "train.lora_dropout: must be 0"),
    ("max_new_tokens past the whole context", lambda tmp: fresh("generate", "--set", "generate.max_new_tokens=300"),
     "300 new tokens leave no room for a prompt"),
    ("template variable that kd sets itself", lambda tmp: fresh("score", "--set", "score.chat_template_kwargs={tokenize: false}"),
     "tokenize is set by kd itself"),
    ("--set value that is not YAML", lambda tmp: fresh("score", "--set", "score.chat_template_kwargs={enable_thinking: false"),
     "the value is not valid YAML"),
    ("non-UTF-8 bytes", prompts_case(b'{"prompt": "\xff"}\n'), "is not UTF-8"),
    ("truncated .zst", truncated_zst, "not a complete zstandard file"),
    ("unknown config key", lambda tmp: fresh("generate", "--set", "train.learnig_rate=1"), "did you mean train.learning_rate"),
    ("unknown section", lambda tmp: fresh("generate", "--set", "trian.lr=1"), "did you mean train"),
    ("value out of range", lambda tmp: fresh("generate", "--set", "generate.top_p=2"), "generate.top_p: must be in (0, 1]"),
    ("value of the wrong type", lambda tmp: fresh("loop", "--set", "epochs=ten"), "config field epochs: expected int"),
    ("negative micro_batch_tokens", lambda tmp: fresh("train", "--set", "train.micro_batch_tokens=-1"),
     "train.micro_batch_tokens: must be >= 0"),
    ("train device that is not one", lambda tmp: fresh("train", "--set", "train.device=gpu1"),
     "train.device: 'gpu1' is not auto, cpu, cuda or cuda:N"),
    ("engine device that is not one", lambda tmp: fresh("generate", "--set", "generate.engine.device=gpu"),
     "engine.device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ("train device no GPU can be", lambda tmp: fresh("train", "--set", "train.device=cuda:3"),
     "train.device: cuda:3, but 0 GPUs are visible to this process; use cpu or auto"),
    ("unknown attention kernel", lambda tmp: fresh("train", "--set", "train.attn_implementation=flash"),
     "not one of auto, sdpa, eager, flash_attention_2"),
    ("flash attention without flash-attn", lambda tmp: fresh("train", "--set", "train.attn_implementation=flash_attention_2"),
     "flash_attention_2 needs the flash-attn package"),
    ("gradient checkpointing that is not a boolean", lambda tmp: fresh("train", "--set", "train.gradient_checkpointing=maybe"),
     "train.gradient_checkpointing: expected bool"),
    ("negative max_staleness", lambda tmp: fresh("loop", "--set", "max_staleness=-1"), "max_staleness: must be >= 0"),
    ("retention shorter than the staleness", lambda tmp: fresh("loop", "--set", "max_staleness=1", "--set", "keep_epochs=1"),
     "keep_epochs: must be 0 (keep every epoch) or at least 1 + max_staleness = 2"),
    ("negative keep_adapters_every", lambda tmp: fresh("loop", "--set", "keep_epochs=2", "--set", "keep_adapters_every=-1"),
     "keep_adapters_every: must be >= 0"),
    ("unknown importance correction", lambda tmp: fresh("train", "--set", "train.is_correction=clip"),
     "not one of none, tis, mis"),
    ("importance threshold at or below 1", lambda tmp: fresh("train", "--set", "train.is_threshold=1"),
     "train.is_threshold: must be > 1"),
    ("sequence-level truncated IS", lambda tmp: fresh("train", "--set", "train.is_level=geometric"),
     "train.is_level: geometric applies to is_correction mis only"),
    ("assistant prefix with a literal backslash-n", lambda tmp: fresh("score", "--set", "score.assistant_prefix=<think>\\n"),
     "score.assistant_prefix: \"<think>\\\\n\" holds a backslash and n, not a newline; write it in double quotes"),
    ("real world holding out every sum", lambda tmp: ["real", "--config", shutil.copy(REPO / "configs" / "smollm2-arithmetic.yaml", tmp),
                                                    "--set", "real.arithmetic_heldout_pairs=45"],
     "real.arithmetic_heldout_pairs: must be in [1, 44]: there are 45 pairs of addends in [1, 9]"),
    ("sampler GPUs that are not indices", lambda tmp: fresh("loop", "--set", "overlap.sampler_devices=cuda:1"),
     "overlap.sampler_devices: 'cuda:1' is not a list of GPU indices"),
    ("negative sampler threads", lambda tmp: fresh("loop", "--set", "overlap.sampler_threads=-2"),
     "overlap.sampler_threads: must be >= 0"),
    ("unknown engine", lambda tmp: fresh("score", "--set", "score.engine.kind=tgi"), "not one of hf, vllm, sglang"),
    ("server that is not a URL", lambda tmp: fresh("score", "--set", "score.engine.kind=vllm", "--set",
                                                   "score.engine.server=127.0.0.1:8001"),
     "score.engine.server: '127.0.0.1:8001' is not an http:// or https:// URL"),
    ("server list naming a server twice", lambda tmp: fresh("score", "--set", "score.engine.kind=vllm", "--set",
                                                            "score.engine.server=[http://127.0.0.1:8001, http://127.0.0.1:8001]"),
     "score.engine.server: a URL is listed twice"),
    ("empty server list", lambda tmp: fresh("score", "--set", "score.engine.kind=vllm", "--set", "score.engine.server=[]"),
     "score.engine.server: an empty list; give one URL or more"),
    ("served_model without a server", lambda tmp: fresh("score", "--set", "score.engine.served_model=Qwen/Qwen3-32B"),
     "score.engine.served_model: names what a server serves, but engine.server is not set"),
    ("negative seconds_per_token", lambda tmp: fresh("score", "--set", "score.engine.seconds_per_token=-1"),
     "score.engine.seconds_per_token: must be >= 0"),
    ("malformed --set", lambda tmp: fresh("generate", "--set", "epochs"), "expected section.key=value"),
    ("top-k loss without top-k scores", lambda tmp: fresh("train", "--set", "train.topk_reverse_kl=1"),
     "need the teacher's top-k: set score.top_k"),
    ("report on a directory without metrics", lambda tmp: ["report", str(tmp)], "no metrics.jsonl to report on"),
    ("invalid YAML config", bad_yaml, "invalid YAML"),
    ("missing config file", lambda tmp: ["loop", "--config", f"{tmp}/nope.yaml"], "config file not found"),
    ("missing model directory", lambda tmp: fresh("generate", "--set", f"student={tmp}/no-model"), "model directory not found"),
    ("teacher with another tokenizer", other_tokenizer, "vocabulary differs"),
    ("teacher with fewer output rows than the student", narrow_teacher,
     "narrow-teacher/config.json: the teacher's output head has 264 rows (vocab_size), fewer than the student's 272"),
    ("adapter for another base model", foreign_adapter, "does not fit the student"),
    ("corrupted Arrow part", corrupt_part, "sha256 differs"),
    ("manifest hash that does not match", manifest_hash_mismatch, "sha256 differs"),
    ("dataset of an older schema version", old_schema, "schema version 0"),
    ("NaN in logprobs", nan_logprob, "non-finite logprob"),
    ("run made with another config", changed_config, "made with another config (differs in train.learning_rate)"),
    ("stage run out of order", lambda tmp: ["score", "--run", "base", "--epoch", "1"], "run `kd generate --epoch 1` first"),
    ("run id with a slash", lambda tmp: fresh("generate", "--run", "a/b"), "run_id: must be a non-empty name"),
    ("another kd process writes the run", export_lora_while_held("busy", ".lock"), "another kd process is writing this run"),
    ("disk full while writing", disk_full, "File too large"),
    ("the same stage started twice at once", export_lora_while_held("twice", ".locks/0000-export_lora.lock"), "another kd process is writing 0000-export_lora"),
    ("next stage while an array task is missing", missing_shard, "1 of 2 shards missing (1); run them"),
    ("shard outside the array", lambda tmp: ["generate", "--run", "base", "--epoch", "1", "--shard", "2", "--num-shards", "2"],
     "--shard 2: must be in 0..1"),
    ("Slurm resources file without a slurm section",
     lambda tmp: ["slurm", "--run", "base", "--dry-run", "--resources", str(write(tmp / "res.yaml", "partition: gpu\n"))],
     "no `slurm:` mapping"),
    ("several Slurm nodes for a stage other than train",
     lambda tmp: ["slurm", "--run", "base", "--dry-run", "--set", "slurm.score.nodes=2"],
     "slurm.score.nodes: must be 1: only train runs on several nodes (score scales out as array tasks: slurm.score.tasks)"),
    ("no Slurm nodes for train", lambda tmp: ["slurm", "--run", "base", "--dry-run", "--set", "slurm.train.nodes=0"],
     "slurm.train.nodes: must be > 0"),
    ("status of a directory that is not a run", lambda tmp: ["status", str(tmp)], "not a kd run (no config.yaml)"),
    ("prompt routed to no teacher", routed_to_no_teacher, "routed.jsonl:2: field domain: 'math' names no teacher; score.teachers has code"),
    ("teachers without a routing field", lambda tmp: fresh("score", "--set", "score.teachers={code: {model: m}}"),
     "set score.route_by to the prompt field"),
    ("score --teacher that the run does not have", lambda tmp: ["score", "--run", "base", "--epoch", "1", "--teacher", "code"],
     "--teacher code: this run has no such teacher; its teachers are default"),
    ("unknown task", lambda tmp: fresh("generate", "--set", "task=gsm8k"), "not one of last-integer, math, humaneval"),
    ("bad train prompt file for a new kd loop",  # refused before the first evaluation writes anything
     lambda tmp: fresh("loop", "--set", f"generate.prompts={write(tmp / 'loop.jsonl', chr(123) + '}' + chr(10))}"),
     "loop.jsonl:1: missing field"),
    ("code task with a plain answer", lambda tmp: fresh("generate", "--set", "task=humaneval"),
     ":1: field answer: task humaneval checks answers that are a mapping {prompt, test, entry_point}, got '"),
    ("read-only run directory", read_only_run, "Read-only file system"),
    ("unknown reporter", lambda tmp: fresh("loop", "--set", "report_to=[tensorboard, mlflow]"),
     "report_to[1]: 'mlflow' is not one of tensorboard, wandb"),
    ("reporter listed twice", lambda tmp: fresh("loop", "--set", "report_to=[wandb, wandb]"),
     "report_to: ['wandb', 'wandb']: a reporter is listed twice"),
    ("report_to that is not a list", lambda tmp: fresh("loop", "--set", "report_to=wandb"),
     "config field report_to: expected a list, got 'wandb'"),
    ("wandb without the wandb package", wandb_not_installed, "wandb needs the wandb package; pip install 'kd[wandb]'"),
    ("empty W&B project", lambda tmp: fresh("loop", "--set", "wandb.project=''"), "wandb.project: must be a non-empty"),
    ("W&B tags that are not a list", lambda tmp: fresh("loop", "--set", "wandb.tags=toy"),
     "config field wandb.tags: expected a list, got 'toy'"),
]


@pytest.fixture(scope="module")
def base_run(tiny_world, tmp_path_factory) -> Path:
    """runs/base: epoch 0 complete on the tiny world; cases run with runs/ relative to this folder."""
    root = tmp_path_factory.mktemp("bad-input")
    config = tiny_config(tiny_world, root / "runs", run_id="base", **{"generate.prompts_per_epoch": 4})
    session = Session(config, progress=False)
    rundir.prepare(config)
    generate.run(config, 0, session)
    score.run(config, 0, session)
    train.run(config, 0, progress=False)
    export_lora.run(config, 0)
    saved = yaml.safe_load((config.run_dir / "config.yaml").read_text())
    saved["runs_dir"] = "runs"  # stage commands find the run from its id, relative to the cwd
    save_config(config.run_dir, saved)
    (root / "runs.yaml").write_text(yaml.safe_dump({**saved, "run_id": "fresh"}))
    return root


def tree(root: Path) -> dict:
    """Every path under root, files with their mtime; lock files (the run's, its stages') are not data."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else "dir"
        for p in sorted(root.rglob("*")) if p.name != ".lock" and ".locks" not in p.parts
    }


def run_kd(argv: list[str], file_limit: int | None = None) -> int:
    import resource
    import signal

    from kd.cli.main import main

    old_argv, old_limit = sys.argv, resource.getrlimit(resource.RLIMIT_FSIZE)
    sys.argv = ["kd", *argv]
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if file_limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, old_limit[1]))
    try:
        main()
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
        sys.argv = old_argv


@pytest.mark.parametrize("name, make_args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(base_run, tiny_world, monkeypatch, capsys, name, make_args, message):
    monkeypatch.chdir(base_run)
    args = make_args(base_run)
    before = tree(base_run / "runs")
    code = run_kd(args, getattr(make_args, "limit", None))
    if hasattr(make_args, "handle"):
        make_args.handle.close()
    if hasattr(make_args, "cleanup"):
        make_args.cleanup()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: error:")]
    assert code != 0
    assert len(errors) == 1 and message in errors[0], errors
    assert tree(base_run / "runs") == before
    if os.environ.get("KD_BAD_INPUT_TABLE"):
        # the pytest temporary folders change from run to run; the table should not
        shown = errors[0].replace(str(base_run), "$RUN").replace(str(tiny_world), "$WORLD").replace("|", "\\|")
        with open(os.environ["KD_BAD_INPUT_TABLE"], "a") as table:
            table.write(f"| {name} | `{' '.join(args).replace(str(base_run), '$RUN')}` | {shown} |\n")


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30