"""A real Slurm for the tests and the Slurm benchmark: munged, slurmctld and slurmd from Debian's
slurm-wlm, on this host, with state, logs and ports of their own (nothing in /etc/slurm).

    with LocalSlurm(tmp_dir) as cluster:        # cluster.env: SLURM_CONF for sbatch, squeue, kd slurm
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})

nodes > 1: that many nodes, each a slurmd of its own on this host (`slurmd -N`; Debian's build allows
several per host), so a multi-node job really spans Slurm nodes, srun steps included; the first
is named after this host, so its name resolves (the others' need not: nothing connects to them).

No cgroups: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none run in a container without
systemd. Jobs run as the submitting user with its environment (sbatch's default --export=ALL).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def cannot_start() -> str | None:
    """Why a local Slurm cannot be started here (None: it can)."""
    found = {name: shutil.which(name) or (Path("/usr/sbin") / name).is_file() for name in (*DAEMONS, "sbatch", "squeue")}
    missing = [name for name, ok in found.items() if not ok]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing); `just install-slurm` (run by .ci/run) installs it"
    if os.geteuid() != 0:
        return "starting munged and slurmd as daemons of this test needs root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def munge_running() -> bool:
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True,
                                                          timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munge() -> None:
    """munged as the munge user (it refuses root), with the key the Debian package generated."""
    if munge_running():
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
    for _ in range(50):
        if munge_running():
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None, nodes: int = 1):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.nodes = [self.node] + [f"{self.node}-node{i}" for i in range(1, nodes)]
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def write_conf(self) -> None:
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        memory_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
        lines = {
            "ClusterName": "kdtest", "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmUser": "root", "SlurmdUser": "root", "AuthType": "auth/munge",
            # %n: the node's name, so that the slurmds of one host keep apart.
            "StateSaveLocation": self.root / "state", "SlurmdSpoolDir": self.root / "spool-%n",
            "SlurmctldPidFile": self.root / "slurmctld.pid", "SlurmdPidFile": self.root / "slurmd-%n.pid",
            "SlurmctldLogFile": self.root / "log" / "slurmctld.log", "SlurmdLogFile": self.root / "log" / "slurmd-%n.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "MpiDefault": "none",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill", "ReturnToService": 2,
            # Finished jobs stay visible to scontrol (start/end times for the overhead measurement).
            "MinJobAge": 600, "SchedulerParameters": "sched_interval=1", "MessageTimeout": 30,
            "PlugStackConfig": self.root / "plugstack.conf",
        }
        text = "".join(f"{key}={value}\n" for key, value in lines.items())
        text += "".join(f"NodeName={name} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus} "
                        f"RealMemory={memory_mb} State=UNKNOWN\n" for name in self.nodes)
        text += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(text)

    def start(self) -> "LocalSlurm":
        start_munge()
        self.write_conf()
        env = {**os.environ, **self.env}
        # -D: foreground, so the daemon is our child and dies with stop(); -i: ignore stale state.
        daemons = {"slurmctld": ["-i"], **{f"slurmd-{name}": ["-N", name] for name in self.nodes}}
        for daemon, options in daemons.items():
            log = open(self.root / "log" / f"{daemon}.stderr", "w")
            args = [f"/usr/sbin/{daemon.split('-')[0]}", "-D", "-f", str(self.conf), *options]
            self.processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            states = state.stdout.split()
            if state.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mixed", "allocated"}:
                return self
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.5)
        logs = " | ".join((self.root / "log" / f"{d}.stderr").read_text()[-500:] for d in daemons)
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {logs}")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes = []

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
