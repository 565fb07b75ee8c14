"""Each stage on tiny real models in a temporary directory (tier 2)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from kd.stages import datasets_io, evaluate as eval_stage, export_lora, generate, pipeline, rundir, score, train
from kd.stages.errors import KdError
from kd.stages.schemas import EVAL, ROLLOUTS, SCORED, TRAIN_STEPS
from kd.stages.session import Session
from kd.stages.policy import policy_model
from kd.stages.train import Collator, features


def run_epoch(config, epoch, session):
    rundir.prepare(config)
    generate.run(config, epoch, session)
    score.run(config, epoch, session)
    train.run(config, epoch, progress=False)
    return export_lora.run(config, epoch)


def loads_everywhere(directory, kind):
    """polars and datasets both read the parts; row counts agree with the manifest."""
    from datasets import load_dataset

    manifest = datasets_io.read_manifest(directory)
    assert manifest["kind"] == kind.name and manifest["schema_version"] == kind.version
    frame = pl.scan_ipc(str(directory / "*.arrow")).collect()
    assert frame.height == manifest["rows"] > 0
    assert frame.columns == kind.schema.names
    hf = load_dataset("arrow", data_files=str(directory / "*.arrow"), split="train")
    assert hf.num_rows == manifest["rows"]
    for entry in manifest["files"]:
        path = directory / entry["path"]
        assert path.stat().st_size == entry["bytes"] and datasets_io.sha256_file(path) == entry["sha256"]
    return frame


def recomputed_logprobs(config, adapter, table):
    """log pi(y_t) of each completion token as the train stage computes it."""
    model = policy_model(config, adapter).eval()
    examples = features(table, config.train, adapter)
    batch = Collator(model.config.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["shift_labels"] != -100
    targets = batch["shift_labels"].clamp(min=0)[..., None]
    return torch.log_softmax(logits.float(), -1).gather(-1, targets)[..., 0][mask], batch["sampler_logprobs"][mask]


def test_stages_write_declared_datasets(make_config):
    config = make_config()
    session = Session(config, progress=False)
    run_epoch(config, 0, session)
    rollouts = loads_everywhere(pipeline.stage_dir(config, 0, "rollouts"), ROLLOUTS)
    assert rollouts.height == 8 * 2
    assert (rollouts["completion_token_ids"].list.len() == rollouts["sampler_logprobs"].list.len()).all()
    scored = loads_everywhere(pipeline.stage_dir(config, 0, "scored"), SCORED)
    assert (scored["teacher_logprobs"].list.len() == scored["completion_token_ids"].list.len()).all()
    steps = loads_everywhere(pipeline.stage_dir(config, 0, "train"), TRAIN_STEPS)
    assert steps.height == 1  # 16 samples / (8 x 2 accumulation)
    adapter = pipeline.stage_dir(config, 0, "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == config.student
    manifest = datasets_io.read_manifest(pipeline.stage_dir(config, 0, "scored"))
    assert manifest["inputs"][0]["manifest_sha256"] == datasets_io.manifest_hash(pipeline.stage_dir(config, 0, "rollouts"))
    eval_dir = eval_stage.run(config, 1, session)
    frame = loads_everywhere(eval_dir, EVAL)
    assert sorted(set(frame["decoding"])) == ["greedy", "sample"]
    stats = datasets_io.read_manifest(eval_dir)["stats"]
    assert stats["heldout_reverse_kl"] > 0 and 0 <= stats["accuracy"] <= 1


def test_sampler_logprobs_equal_trainer_logprobs(make_config):
    """The on-policy invariant, for the base policy and for a trained adapter."""
    config = make_config()
    session = Session(config, progress=False)
    adapter = run_epoch(config, 0, session)
    trained = json.loads((pipeline.stage_dir(config, 0, "train") / "state.json").read_text())
    assert trained["global_step"] == 1
    for epoch, policy_adapter in ((0, None), (1, adapter)):
        generate.run(config, epoch, session)
        score.run(config, epoch, session)
        table = datasets_io.read_table(pipeline.stage_dir(config, epoch, "scored"), SCORED)
        recomputed, recorded = recomputed_logprobs(config, policy_adapter, table)
        assert torch.max(torch.abs(recomputed - recorded)) < 1e-5, epoch


def test_training_changes_the_adapter_and_resumes_optimizer(make_config):
    from safetensors.torch import load_file

    config = make_config()
    session = Session(config, progress=False)
    first = load_file(str(run_epoch(config, 0, session) / "adapter_model.safetensors"))
    second = load_file(str(run_epoch(config, 1, session) / "adapter_model.safetensors"))
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(first[k]) for k in lora_b)  # B starts at zero: it moved
    assert any(not torch.equal(first[k], second[k]) for k in first)
    optimizer = torch.load(pipeline.stage_dir(config, 1, "train") / "optimizer.pt", weights_only=True)
    assert all(int(state["step"]) == 2 for state in optimizer["state"].values())  # Adam state carried over


ON_GPU = {"train.precision": "auto", "generate.engine.device": "cuda", "generate.engine.dtype": "auto",
          "score.engine.device": "cuda", "score.engine.dtype": "auto"}


@pytest.mark.parametrize("overrides", [
    {"train.precision": "float32"},
    {"train.precision": "bf16"},
    pytest.param(ON_GPU, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="engines and trainer on a CUDA GPU in bf16: CI machines have none (passed on an H200, 2026-11-28)",
    )),
], ids=["float32", "bf16-cpu-autocast", "cuda-bf16"])
def test_loop_session_trains_what_standalone_train_stages_train(make_config, overrides):
    """`kd loop` keeps the trainable student loaded and loads each epoch's adapter into it; the adapters
    must be the ones that a fresh process per train stage makes, bit for bit, and the fresh LoRA of
    epoch 0 must come back after training. bf16 is the GPU default: accelerate prepares a model once,
    so a kept student must be prepared (autocast-wrapped) again each epoch."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from kd.stages.policy import Policy

    kept, fresh = make_config(run_id="kept", **overrides), make_config(run_id="fresh", **overrides)
    with Session(kept, progress=False) as kept_session, Session(fresh, progress=False) as fresh_session:
        for epoch in (0, 1):
            for config, session, train_session in ((kept, kept_session, kept_session), (fresh, fresh_session, None)):
                rundir.prepare(config)
                generate.run(config, epoch, session)
                score.run(config, epoch, session)
                train.run(config, epoch, train_session, progress=False)
                export_lora.run(config, epoch)
        for epoch in (0, 1):
            names = [pipeline.stage_dir(config, epoch, "adapter") / "adapter_model.safetensors" for config in (kept, fresh)]
            assert names[0].read_bytes() == names[1].read_bytes(), epoch
        trained = load_file(str(names[0]))
        restored = {name: tensor.cpu() for name, tensor in get_peft_model_state_dict(kept_session.policy().load(None)).items()}
    initial = get_peft_model_state_dict(Policy(fresh).model)
    assert restored.keys() == initial.keys() == trained.keys()
    assert all(torch.equal(restored[name], initial[name]) for name in initial)
    assert any(not torch.equal(restored[name], trained[name]) for name in restored)


def test_adapter_of_another_rank_is_refused_by_the_train_stage(make_config, tmp_path):
    from kd.stages.policy import Policy

    Policy(make_config(**{"train.lora_rank": 4})).model.save_pretrained(tmp_path / "rank4")
    with pytest.raises(KdError, match="does not fit the student"):
        Policy(make_config(**{"train.lora_rank": 8})).load(tmp_path / "rank4")


def test_saved_adapter_is_what_peft_save_pretrained_writes(make_config, tmp_path):
    """kd writes the adapter files itself (no model card, no state-dict walk): the weights, their
    metadata and the config must still be PEFT's own."""
    from safetensors import safe_open

    from kd.stages.policy import Policy
    from kd.stages.train import save_adapter

    policy = Policy(make_config())
    with torch.no_grad():
        for parameter in policy.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))  # B starts at zero: make every tensor tell
    policy.model.save_pretrained(tmp_path / "peft")
    save_adapter(policy, tmp_path / "kd")
    files = [safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") for name in ("peft", "kd")]
    assert files[0].metadata() == files[1].metadata()
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    assert all(torch.equal(files[0].get_tensor(key), files[1].get_tensor(key)) for key in files[0].keys())
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("peft", "kd")]
    assert configs[0] == configs[1]


def test_teacher_equal_to_student_gives_zero_kl(make_config):
    config = make_config(teacher=make_config().student)
    session = Session(config, progress=False)
    rundir.prepare(config)
    generate.run(config, 0, session)
    scored = score.run(config, 0, session)
    table = datasets_io.read_table(scored, SCORED)
    sampler = np.concatenate(table.column("sampler_logprobs").to_numpy(zero_copy_only=False))
    teacher = np.concatenate(table.column("teacher_logprobs").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(sampler, teacher, atol=1e-5)
    assert abs(datasets_io.read_manifest(scored)["stats"]["teacher_kl"]) < 1e-6


def test_teacher_with_another_tokenizer_is_refused(make_config, tiny_world, tmp_path):
    from kd.stages.tasks.toy import build_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_world / "teacher", other)
    build_tokenizer(["1+2=3 so 3", "different corpus"], vocab_size=270).save_pretrained(other)
    config = make_config(teacher=str(other))
    rundir.prepare(config)
    session = Session(config, progress=False)
    with pytest.raises(KdError, match="vocabulary differs"):  # before sampling: generate checks the teacher's prompts
        generate.run(config, 0, session)
    assert not pipeline.stage_dir(config, 0, "rollouts").exists()


def test_merged_export_matches_adapter(make_config):
    from transformers import AutoModelForCausalLM

    config = make_config()
    session = Session(config, progress=False)
    run_epoch(config, 0, session)
    shutil.rmtree(pipeline.stage_dir(config, 0, "adapter"))
    adapter = export_lora.run(config, 0, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged").eval()
    peft_model = policy_model(config, adapter).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_readme_inspection_lines_and_kd_inspect(make_config, capsys):
    """The polars and datasets one-liners of the README run as written on a real scored dataset."""
    from pathlib import Path

    from kd.stages import inspection as inspect_stage

    config = make_config()
    session = Session(config, progress=False)
    rundir.prepare(config)
    generate.run(config, 0, session)
    scored = score.run(config, 0, session)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "runs/toy/0000/scored/*.arrow" in line and line.startswith(("import", "from"))]
    assert len(lines) == 2
    for line in lines:
        *setup, expression = line.replace("runs/toy/0000/scored", str(scored)).split("; ")
        namespace: dict = {}
        exec("\n".join(setup), namespace)
        assert len(eval(expression, namespace)) == 16
    summary = inspect_stage.run(scored)
    assert summary["rows"] == 16 and summary["completion_tokens"] > 0 and "mean_kl_per_token" in summary
    assert "reward=" in capsys.readouterr().err


def test_toy_world_is_deterministic_from_its_seed(tmp_path):
    from kd.stages.config import ToyConfig
    from kd.stages.tasks.toy import build

    tiny = ToyConfig(train_prompts=8, heldout_prompts=4, width=32, teacher_layers=1, student_layers=1,
                     teacher_steps=3, student_steps=2, sft_batch_size=4, vocab_size=270)
    reports = [build(tiny, tmp_path / name, log=lambda *_: None) for name in ("a", "b")]
    for role in ("teacher", "student"):
        first, second = (tmp_path / name / role / "model.safetensors" for name in ("a", "b"))
        assert datasets_io.sha256_file(first) == datasets_io.sha256_file(second)
    assert (tmp_path / "a" / "prompts" / "train.jsonl.zst").read_bytes() == (tmp_path / "b" / "prompts" / "train.jsonl.zst").read_bytes()
    assert reports[0]["student"]["sft_steps"] == 2
    # the same place asked for another world: one line naming what differs, nothing rebuilt over it
    with pytest.raises(KdError, match=r"tmp.*/a: a toy world built from another config is there \(seed 0 -> 1\); "
                                      "delete it to build it anew, or pick another toy_dir"):
        build(dataclasses.replace(tiny, seed=1), tmp_path / "a", log=lambda *_: None)


def test_train_stops_on_exploding_ratio_and_non_finite_numbers(make_config):
    config = make_config(**{"train.passes": 2, "train.max_ratio": 1.0001})
    session = Session(config, progress=False)
    rundir.prepare(config)
    generate.run(config, 0, session)
    score.run(config, 0, session)
    with pytest.raises(KdError, match=r"importance ratio .* > train.max_ratio 1.0001 at optimiser step 2"):
        train.run(config, 0, progress=False)
    assert not pipeline.stage_dir(config, 0, "train").exists()
    raised = make_config(**{"train.passes": 2, "train.max_ratio": 1e4})  # the message's way on: the same run resumes
    rundir.prepare(raised)
    train.run(raised, 0, progress=False)
    assert pipeline.stage_dir(raised, 0, "train").exists()

    diverging = make_config(run_id="diverging", **{"train.passes": 3, "train.learning_rate": 1e30, "train.max_grad_norm": 0})
    rundir.prepare(diverging)
    generate.run(diverging, 0, session)
    score.run(diverging, 0, session)
    with pytest.raises(KdError, match="non-finite"):
        train.run(diverging, 0, progress=False)
    assert not pipeline.stage_dir(diverging, 0, "train").exists()


def test_top_k_scores_and_trains_on_the_top_k_divergence_alone(make_config):
    from kd.stages import inspection

    top_k = 8
    config = make_config(**{"score.top_k": top_k, "train.kl_coef": 0.0, "train.topk_reverse_kl": 1.0})
    session = Session(config, progress=False)
    adapter = run_epoch(config, 0, session)
    scored_dir = pipeline.stage_dir(config, 0, "scored")
    scored = loads_everywhere(scored_dir, SCORED)
    lengths = scored["completion_token_ids"].list.len()
    assert (scored["teacher_top_ids"].list.len() == top_k * lengths).all()
    masses = []
    for row in scored.iter_rows(named=True):
        ids = np.array(row["teacher_top_ids"]).reshape(-1, top_k)
        logprobs = np.array(row["teacher_top_logprobs"]).reshape(-1, top_k)
        assert (np.diff(logprobs, axis=-1) <= 0).all()  # most likely first
        for t, token in enumerate(row["completion_token_ids"]):
            if token in ids[t]:
                assert abs(logprobs[t][list(ids[t]).index(token)] - row["teacher_logprobs"][t]) < 1e-6
            else:
                assert row["teacher_logprobs"][t] <= logprobs[t, -1] + 1e-6
        masses.extend(np.exp(logprobs.astype(np.float64)).sum(-1))
    stats = datasets_io.read_manifest(scored_dir)["stats"]
    assert stats["top_k"] == top_k and stats["top_k_mass"] == pytest.approx(np.mean(masses), abs=1e-6)
    assert 0 < stats["top_k_mass"] <= 1 + 1e-6
    assert inspection.run(scored_dir)["top_k"] == top_k

    # kl_coef 0: the sampled-token term is exactly zero, so only the top-k divergence moved the adapter.
    steps = datasets_io.read_table(pipeline.stage_dir(config, 0, "train"), TRAIN_STEPS)
    assert steps.column("loss")[0].as_py() > 0
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(w) for name, w in weights.items() if "lora_B" in name)


def test_top_k_above_the_vocabulary_is_one_clear_line(make_config):
    config = make_config(**{"score.top_k": 100000})
    session = Session(config, progress=False)
    rundir.prepare(config)
    generate.run(config, 0, session)
    with pytest.raises(KdError, match="score.top_k = 100000 exceeds the teacher's vocabulary"):
        score.run(config, 0, session)
    assert not pipeline.stage_dir(config, 0, "scored").exists()


@pytest.mark.parametrize("objective", [
    {},
    {"train.kl_coef": 0, "train.topk_reverse_kl": 1},
    {"train.topk_forward_kl": 0.5, "train.clip_epsilon": 0.2},
    {"train.kl_coef": 0.3, "train.topk_jsd": 1, "train.ratio_cap": 2},
], ids=["sampled-token", "top-k reverse KL", "top-k forward KL + sampled", "top-k JSD + sampled"])
def test_train_objective_equals_the_full_logits_computation(make_config, objective):
    """The chunked head on completion positions gives the loss and LoRA gradients that the whole
    [B, T, V] logits gave (the train stage's formula before the chunking, written out here)."""
    from kd.stages import loss as loss_lib
    from kd.stages.objective import step_loss
    from kd.stages.policy import Policy

    config = make_config(**{"score.top_k": 6, **objective})
    rundir.prepare(config)
    with Session(config, progress=False) as session:
        generate.run(config, 0, session)
        table = datasets_io.read_table(score.run(config, 0, session), SCORED)
    policy = Policy(config)
    model = policy.load(None)
    with torch.no_grad():  # a LoRA away from zero, so that its gradients are not special
        for weight in policy.trainable.values():
            weight.add_(0.05 * torch.randn_like(weight))
    cfg = config.train
    batch = Collator(model.config.pad_token_id, 6 if cfg.uses_top_k else 0)(features(table, cfg, None, 6))
    mask = batch["shift_labels"] != -100
    normaliser = mask.sum()

    def gradients(loss):
        return [g.clone() for g in torch.autograd.grad(loss, list(policy.trainable.values()))]

    step = step_loss(model, policy.head, batch, cfg, normaliser, processes=1)
    loss, stats, entropy = step.loss, step.stats, step.entropy_sum
    got = gradients(loss)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    targets = batch["shift_labels"].clamp(min=0)
    reference, reference_stats = loss_lib.policy_loss(
        logp.gather(-1, targets[..., None])[..., 0], batch["sampler_logprobs"], batch["advantages"], mask, normaliser,
        cfg.clip_epsilon, cfg.ratio_cap,
    )
    for kind, coef in (("reverse_kl", cfg.topk_reverse_kl), ("forward_kl", cfg.topk_forward_kl), ("jsd", cfg.topk_jsd)):
        if coef:
            divergence = loss_lib.topk_divergence(logp.gather(-1, batch["teacher_top_ids"]), batch["teacher_top_logprobs"],
                                                  kind, cfg.jsd_beta)
            reference = reference + coef * torch.where(mask, divergence, 0.0).sum() / normaliser
    want = gradients(reference)
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)
    assert entropy == pytest.approx(float(-(logp.exp() * logp).sum(-1)[mask].sum()), rel=1e-5)
    assert (stats.tokens, stats.clipped) == (reference_stats.tokens, reference_stats.clipped)
    assert max(float(g.abs().max()) for g in want) > 1e-4  # the comparison compares something
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_session_close_releases_every_engine(make_config):
    """close() is part of the engine protocol: the session closes each engine it built (the hf one drops its model)."""
    config = make_config()
    with Session(config, progress=False) as session:
        engine = session.engine("student", config.generate.engine)
        assert engine.base is not None
    assert engine.base is None and engine.model is None
