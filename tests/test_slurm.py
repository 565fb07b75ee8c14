"""`kd slurm` on a real single-node Slurm (munged, slurmctld, slurmd started here; .ci/run installs
Debian's slurm-wlm and munge): a 2-epoch toy run as array jobs equals `kd loop`'s, and an array
task cancelled mid-run leaves no part and is finished by resubmitting. On a two-node Slurm (two
slurmds of this host), the train job of slurm.train.nodes 2 trains the adapter of one process."""

from __future__ import annotations

import os
import subprocess
import time

import pyarrow as pa
import pytest

from kd.stages import config as config_lib, datasets_io, locks, slurm, verify
from kd.stages.schemas import ROLLOUTS, SCORED
from tests.conftest import routed_prompts
from tests.slurm_cluster import LocalSlurm, cannot_start
from tests.test_distributed import SPLIT, adapter_gap, one_process, scored_run  # noqa: F401 (one_process: a fixture)
from tests.test_loop import heldout_kl, kd

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(cannot_start() is not None, reason=cannot_start() or "")]

# Big enough for held-out KL to fall in 2 epochs, small enough for a few minutes on 2 cores.
SETTINGS = {
    "epochs": 2, "generate.prompts_per_epoch": 64, "train.batch_size": 64, "train.warmup_steps": 0,
    "eval.every": 1, "eval.num_prompts": 64,
    "slurm.generate.tasks": 2, "slurm.score.tasks": 2, "slurm.train.tasks": 2, "slurm.train.cpus": 2,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def slurm_env(cluster) -> dict:
    return {**cluster.env, "OMP_NUM_THREADS": "1"}


def keys_and_tokens(directory, kind) -> tuple[list, list]:
    table: pa.Table = datasets_io.read_table(directory, kind)
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist()))
    return keys, table.column("completion_token_ids").to_pylist()


def loop_and_slurm(cluster, config: str, run_id: str) -> str:
    """`kd loop` of `config` as run `loop`, then `kd slurm --wait` of it as `run_id`; kd slurm's output."""
    reference = kd("loop", "--config", config, "--run", "loop")
    assert reference.returncode == 0, reference.stderr[-2000:]
    submitted = kd("slurm", "--config", config, "--run", run_id, "--wait", env=slurm_env(cluster), cwd=os.getcwd())
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    return submitted.stdout


def test_kd_slurm_two_epochs_cover_kd_loops_samples_and_lower_kl(cluster, toy_config_file, tmp_path):
    runs = tmp_path / "runs"
    assert "submitted 11 jobs" in loop_and_slurm(cluster, str(toy_config_file(**SETTINGS)), "arrays")

    for epoch in ("0000", "0001"):
        for stage, kind in (("rollouts", ROLLOUTS), ("scored", SCORED)):
            ours = runs / "arrays" / epoch / stage
            assert datasets_io.read_manifest(ours)["stats"]["shards"] == 2  # written by a 2-task array job
            keys, tokens = keys_and_tokens(ours, kind)
            their_keys, their_tokens = keys_and_tokens(runs / "loop" / epoch / stage, kind)
            assert keys == their_keys and len(set(keys)) == 256
            same = sum(a == b for a, b in zip(tokens, their_tokens)) / len(tokens)
            # Epoch 0 samples the base model: identical. Epoch 1 samples an adapter trained by 2
            # processes vs 1, equal to float tolerance, so a rare sample may branch differently.
            assert same == 1.0 if epoch == "0000" else same > 0.95, (epoch, stage, same)
    logs = sorted(p.name for p in (runs / "arrays" / "slurm" / "logs").glob("kd-arrays-0000-generate-*"))
    assert len(logs) == 2 and logs[0].endswith("_0.out") and logs[1].endswith("_1.out")

    kl, their_kl = heldout_kl(runs / "arrays"), heldout_kl(runs / "loop")
    assert set(kl) == set(their_kl) == {0, 1, 2}
    assert kl[2] < 0.9 * kl[0] and their_kl[2] < 0.9 * their_kl[0], (kl, their_kl)
    assert all(abs(kl[e] - their_kl[e]) < 0.02 for e in kl), (kl, their_kl)
    report = verify.run(runs / "arrays")
    assert len(report["datasets"]) == 11 and not any(report["datasets"].values()), report


def squeue(cluster, *args) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, env={**os.environ, **cluster.env}).stdout


def test_cancelled_array_task_leaves_no_part_and_resubmitting_finishes(cluster, toy_config_file, tmp_path):
    # 1024 samples per epoch: generation lasts long enough to cancel a task in the middle of it.
    config = str(toy_config_file(**{**SETTINGS, "epochs": 1, "generate.prompts_per_epoch": 256, "eval.every": 5}))
    run_dir = tmp_path / "runs" / "cancel"
    rollouts = run_dir / "0000" / "rollouts"
    first = kd("slurm", "--config", config, "--run", "cancel", env=slurm_env(cluster))
    assert first.returncode == 0, first.stderr[-2000:]
    array_id = dict(item.split("=") for item in first.stdout.split(": ")[1].split())["0-generate"]

    lock = locks.shard_lock_name(rollouts, 1, 2)
    deadline = time.time() + 300
    while not locks.is_locked(run_dir, lock):  # task 1 is inside its work (the shard lock is held)
        assert time.time() < deadline, squeue(cluster)
        time.sleep(0.2)
    assert subprocess.run(["scancel", f"{array_id}_1"], env={**os.environ, **cluster.env}).returncode == 0
    while squeue(cluster, "-n", ",".join(f"kd-cancel-0000-{c}" for c in ("generate", "score", "train", "export-lora"))):
        assert time.time() < deadline, squeue(cluster)
        time.sleep(0.5)  # the cancelled task's dependents are removed (--kill-on-invalid-dep)
    while locks.is_locked(run_dir, lock):  # without cgroups the task's kd may outlive its batch shell
        assert time.time() < deadline, squeue(cluster)
        time.sleep(0.2)

    assert not (rollouts / datasets_io.MANIFEST).exists()
    assert not (rollouts / datasets_io.part_name(1, 2)).exists() and not list(rollouts.glob(".*.tmp-*"))
    assert 1 not in datasets_io.read_markers(rollouts, 2)
    status = kd("status", str(run_dir), env=cluster.env)
    assert "1/2 shards" in status.stdout or "0/2 shards" in status.stdout, status.stdout

    finished_first = 0 in datasets_io.read_markers(rollouts, 2)
    again = kd("slurm", "--config", config, "--run", "cancel", "--wait", env=slurm_env(cluster))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    script = (run_dir / "slurm" / "kd-cancel-0000-generate.sbatch").read_text()
    assert ("#SBATCH --array=1\n" in script) == finished_first  # only the missing shard was resubmitted
    assert datasets_io.read_manifest(rollouts)["rows"] == 1024
    report = verify.run(run_dir)
    assert not any(report["datasets"].values()), report


def test_each_teacher_scores_in_its_own_array(cluster, toy_config_file, toy_world, tmp_path):
    """Two teachers (the toy teacher, and the toy student as `echo` for every third prompt), two
    array tasks each: the scored dataset equals `kd loop`'s, row for row and teacher for teacher."""
    prompts = tmp_path / "routed.jsonl.zst"
    routed_prompts(toy_world, prompts)
    settings = {**SETTINGS, "epochs": 1, "generate.prompts_per_epoch": 32, "eval.num_prompts": 16,
                "slurm.train.tasks": 1, "generate.prompts": str(prompts), "score.route_by": "domain",
                "score.teachers": f"{{echo: {{model: {toy_world / 'student'}, engine: {{device: cpu, dtype: float32}}}}}}"}
    runs = tmp_path / "runs"
    submitted = loop_and_slurm(cluster, str(toy_config_file(**settings)), "teachers")
    assert "submitted 7 jobs" in submitted  # eval, generate, score x 2 teachers, train, export-lora, eval

    scored = runs / "teachers" / "0000" / "scored"
    assert datasets_io.read_manifest(scored)["stats"]["shards"] == 4  # 2 teachers x 2 array tasks
    logs = sorted(p.name for p in (runs / "teachers" / "slurm" / "logs").glob("kd-teachers-0000-score-*"))
    assert [name.rsplit("-", 1)[0] for name in logs] == ["kd-teachers-0000-score-default"] * 2 + ["kd-teachers-0000-score-echo"] * 2
    ours, theirs = (datasets_io.read_table(d, SCORED) for d in (scored, runs / "loop" / "0000" / "scored"))
    for column in ("prompt_id", "sample_index", "teacher", "completion_token_ids"):
        assert ours.column(column).to_pylist() == theirs.column(column).to_pylist(), column
    assert set(ours.column("teacher").to_pylist()) == {"default", "echo"}
    assert not any(verify.run(runs / "teachers")["datasets"].values())


def test_train_on_two_nodes_trains_the_one_process_adapter(one_process, tiny_world, tmp_path, monkeypatch):
    """The train job kd slurm renders for slurm.train.nodes 2, on a Slurm of two nodes: srun starts
    accelerate on each (machine ranks 0 and 1, one process each) and they train the adapter of one
    process. The two nodes are two slurmds of this one host (a cluster of several hosts is not
    available here), so the rendezvous goes over this host's loopback, not between machines."""
    path = scored_run(tiny_world, tmp_path / "runs", "nodes", **SPLIT, **{"slurm.train.nodes": 2})
    config = config_lib.load(path)
    [train] = [job for job in slurm.plan(config) if job.key == "0-train"]
    with LocalSlurm(tmp_path / "slurm", nodes=2) as cluster:
        monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        job_id = slurm.submit(config, [train])["0-train"]
        slurm.wait(config)
        for node in cluster.nodes:  # srun ran a task of the job's step on each node
            assert f"launch task StepId={job_id}.0 " in (cluster.root / "log" / f"slurmd-{node}.log").read_text(), node
    [log] = (config.run_dir / "slurm" / "logs").glob("kd-nodes-0000-train-*.out")
    trained = config.run_dir / "0000" / "train"
    assert datasets_io.is_complete(trained), log.read_text()[-3000:]
    gap, scale = adapter_gap(one_process, trained)
    assert scale > 1e-3 and gap < 1e-4 * max(scale, 1.0), (gap, scale)
