"""Configs: every shipped YAML validates; bad fields are refused with one line naming them."""

import dataclasses
import typing
from pathlib import Path

import pytest

from kd.stages import config as config_lib
from kd.stages.errors import KdError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = config_lib.load(path)
    assert config.epochs > 0 and config.student and config.teacher
    # Round trip: the resolved config written into a run loads back to the same config.
    reloaded = config_lib.build(config_lib.Config, __import__("yaml").safe_load(config_lib.to_yaml(config)), where="")
    assert reloaded == config


def test_reference_pair_matches_the_reference_pipeline():
    config = config_lib.load(Path("configs/qwen3-4b-from-32b.yaml"))
    t = config.train
    assert (config.student, config.teacher) == ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-32B")
    assert (t.lora_rank, t.lora_alpha, t.lora_dropout, t.learning_rate) == (16, 32, 0.0, 2e-5)
    assert (t.batch_size, t.grad_accum, t.max_grad_norm, t.warmup_steps, t.kl_coef, t.precision) == (4, 8, 1.0, 100, 1.0, "bf16")


def test_thinking_student_config_gives_the_teacher_the_opened_reasoning_block():
    config = config_lib.load(Path("configs/qwen3-4b-thinking-from-32b.yaml"))
    assert (config.student, config.teacher) == ("Qwen/Qwen3-4B-Thinking-2507", "Qwen/Qwen3-32B")
    assert config.teachers["default"].assistant_prefix == "<think>\n"
    assert config.score.chat_template_kwargs.get("enable_thinking", True)  # the 32B in its thinking format


def test_default_is_the_toy_config():
    assert config_lib.load().toy is not None


def test_overrides_are_typed():
    config = config_lib.load(None, ["train.learning_rate=3e-3", "epochs=7", "generate.engine.kind=hf"])
    assert config.train.learning_rate == 0.003 and config.epochs == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learnig_rate=1", "did you mean train.learning_rate"),
        ("trian.lr=1", "did you mean train"),
        ("epochs=ten", "config field epochs: expected int"),
        ("epochs=0", "config field epochs: must be > 0"),
        ("generate.top_p=1.5", "generate.top_p: must be in (0, 1]"),
        ("generate.engine.kind=tgi", "not one of hf, vllm, sglang"),
        ("train.lora_target_modules=q_proj", "expected a list"),
        ("train", "expected section.key=value"),
        # configs/toy.yaml trains on the top-8 reverse KL: without the top-k, that term is refused.
        (["score.top_k=0"], "set score.top_k (e.g. 32), or train.topk_reverse_kl=0 with train.kl_coef=1"),
        (["score.top_k=0", "train.topk_reverse_kl=0", "train.topk_jsd=0.5"],
         "config field train.topk_jsd: the topk_jsd term reads scored top-k columns"),
        (["train.topk_reverse_kl=0"], "config field train.kl_coef: every loss term is 0"),
        ("train.kl_coef=-1", "config field train.kl_coef: must be >= 0"),
        ("task=exact-match", "config field task: 'exact-match' is not one of last-integer"),
        ("score.engine.kind=sglang", "config field score.engine.server: engine.kind sglang runs against a server only"),
        ("generate.engine.max_batch_tokens=0", "config field generate.engine.max_batch_tokens: must be > 0"),
        ("train.jsd_beta=1", "train.jsd_beta: must be in (0, 1)"),
        ("score.top_k=-1", "score.top_k: must be >= 0"),
    ],
)
def test_bad_fields_are_refused_by_name(override, message):
    with pytest.raises(KdError) as err:
        config_lib.load(None, override if isinstance(override, list) else [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fingerprint_ignores_epochs_only():
    base = config_lib.load()
    assert config_lib.load(None, ["epochs=3"]).fingerprint() == base.fingerprint()
    assert config_lib.load(None, ["seed=3"]).fingerprint() != base.fingerprint()


def test_fingerprint_ignores_how_a_server_is_reached_not_which_engine():
    served = ["score.engine.kind=vllm", "score.engine.server=http://10.0.0.1:8000"]
    moved = ["score.engine.kind=vllm", "score.engine.server=http://10.0.0.2:9000", "score.engine.max_retries=9",
             "score.engine.request_timeout=600", "score.engine.concurrency=64"]
    assert config_lib.load(None, served).fingerprint() == config_lib.load(None, moved).fingerprint()
    assert config_lib.load(None, served).fingerprint() != config_lib.load(None, []).fingerprint()


def test_the_registries_are_what_the_config_accepts():
    """An engine, a verifier or a loss term is added in one place: the config takes its names from
    the registries, and reading the top-k columns is what makes a term need score.top_k."""
    from kd.stages import engines, objective, tasks

    assert typing.get_args(typing.get_type_hints(config_lib.EngineConfig)["kind"]) == tuple(engines.REGISTRY)
    assert typing.get_args(typing.get_type_hints(config_lib.Config)["task"]) == tuple(tasks.VERIFIERS)
    assert [t.name for t in objective.TERMS if t.needs_top_k] == ["topk_reverse_kl", "topk_forward_kl", "topk_jsd"]
    for term in objective.TERMS:  # every term's weight is a TrainConfig field
        assert term.weight in {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    assert tasks.VERIFIERS["last-integer"](["7+8+0=15 so 615", "615 or 61"], ["615", "615"]) == [1.0, 0.0]


def test_sglang_sampling_is_refused_at_top_p_below_one():
    server = ["generate.engine.kind=sglang", "generate.engine.server=http://127.0.0.1:30000"]
    assert config_lib.load(None, server).generate.engine.kind == "sglang"
    with pytest.raises(KdError, match="config field generate.top_p: must be 1 with generate.engine.kind sglang"):
        config_lib.load(None, [*server, "generate.top_p=0.9"])


def test_staleness_moves_generates_dependency_in_the_table_and_in_slurm_jobs(tmp_path):
    """max_staleness s: generate of epoch e reads export-lora's adapter of e-1-s, and `kd slurm` makes
    it wait for that job only (so the scheduler overlaps it with the training of e-1 .. e-s)."""
    from kd.stages import pipeline, slurm

    for staleness in (0, 1, 2):
        config = dataclasses.replace(config_lib.Config(), runs_dir=str(tmp_path), epochs=5, max_staleness=staleness)
        for epoch in range(5):
            back = epoch - 1 - staleness
            assert pipeline.inputs_at(pipeline.GENERATE, epoch, staleness) == ([(back, "adapter")] if back >= 0 else [])
            assert pipeline.policy_adapter_dir(config, epoch) == (
                pipeline.stage_dir(config, back, "adapter") if back >= 0 else None)
            assert pipeline.policy_adapter_dir(config, epoch, pipeline.EVAL) == (
                pipeline.stage_dir(config, epoch - 1, "adapter") if epoch else None)
        jobs = {job.key: job.after for job in slurm.plan(config)}
        assert jobs["4-generate"] == [f"{3 - staleness}-export-lora"]
        assert jobs["4-train"] == ["4-score", "3-train"]
