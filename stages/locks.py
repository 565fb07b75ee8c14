"""Locks: advisory flocks that the kernel drops when their holder dies (a killed stage never leaves one).

    runs/<id>/.lock                 the run: shared by stage commands, exclusive for `kd loop`
    runs/<id>/.locks/<name>.lock    what one process writes: a stage of an epoch, or a shard of one
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

from kd.stages.errors import KdError


@contextlib.contextmanager
def whole_run(run_dir: Path, shared: bool = False) -> Iterator[None]:
    """Serialise writers of one run; the kernel drops the lock when its holder dies.

    Shards of one stage (array tasks) run side by side: they hold the lock shared, and each its own
    shard lock (kd.stages.shards), so an unsharded writer such as `kd loop` still excludes them all.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdError(f"{run_dir}: another kd process is writing this run; wait for it to finish") from None
        yield


@contextlib.contextmanager
def named(run_dir: Path, name: str, blocking: bool = True) -> Iterator[None]:
    """An flock on run_dir/.locks/<name>; the kernel releases it when the holder dies."""
    folder = run_dir / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise KdError(
                f"{run_dir}: another kd process is writing {name} of this run (it holds {folder / name}.lock); "
                "wait for it to finish"
            ) from None
        yield


def is_locked(run_dir: Path, name: str) -> bool:
    """Whether a live process holds run_dir/.locks/<name> (a shard being written, for `kd status`)."""
    path = run_dir / ".locks" / f"{name}.lock"
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def stage_lock_name(epoch: int, stage_key: str) -> str:
    """The lock a stage command that writes one whole dataset holds (train, export-lora, eval);
    `stage_key`: kd.stages.pipeline.Stage.key."""
    return f"{epoch:04d}-{stage_key}"


def shard_lock_name(out: Path, shard: int, num_shards: int) -> str:
    return f"{out.parent.name}-{out.name}-{shard:05d}-of-{num_shards:05d}"


def completion_lock_name(out: Path) -> str:
    """The lock under which the shard that completes a sharded dataset writes its manifest."""
    return f"{out.parent.name}-{out.name}-complete"
