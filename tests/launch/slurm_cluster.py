"""A real SLURM cluster on this machine for the launcher tests: munge, slurmctld, one slurmd per
emulated node.

Debian's ``slurmctld slurmd slurm-client munge`` packages, started by hand (no systemd): every
file (config, keys, state, spool, logs) lives in one temporary folder, munge listens on its own
socket there, and each emulated node is a ``slurmd -N <name>`` with its own port. Node names
resolve through lines added to ``/etc/hosts`` (removed again at the end), as on a real cluster
where ``scontrol show hostnames`` gives names the rendezvous must reach. ``stop()`` ends only the
daemons started here, by PID.

There is no ``slurmdbd``: ``sacct`` (which submitit polls) answers "accounting disabled" and
submitit then relies on the result files its jobs write; the tests read job states with
``scontrol show job``, which needs no database.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_TAG = "# omnimoe-train test cluster"


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (the tests skip with it), or None."""
    if os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/munged and need root"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (install the munge package)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]
    cpus_per_node: int
    pids: list[int] = field(default_factory=list)
    hosts_lines: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands (and, through sbatch, for the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
        return subprocess.run(
            list(cmd),
            env=kw.pop("env", self.env()),
            capture_output=True,
            text=True,
            check=check,
            timeout=kw.pop("timeout", 60),
            **kw,
        )

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env()).stdout
        return out.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job is gone)."""
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", res.stdout))

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; raise with the job's record otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("log/*.log")):
            tail = log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"== {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs left, end the daemons started here (by PID), remove the /etc/hosts
        lines and the folder."""
        if len(self.pids) > 1 and self.conf.exists():  # slurmctld was started
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + 40  # KillWait (30 s) ends any step that ignores TERM
            while time.monotonic() < deadline:
                res = self.run("squeue", "-h", "-o", "%i", check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.5)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for pid in self.pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.hosts_lines:
            kept = [ln for ln in HOSTS_FILE.read_text().splitlines() if ln not in self.hosts_lines]
            HOSTS_FILE.write_text("\n".join(kept) + "\n")
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we forked and that exited stays a zombie until reaped; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()


def _read_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"daemon did not write {path}")


SLURM_CONF = """\
ClusterName=omnimoe-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start 10 s after it ended (the default waits 120 s).
AuthInfo=cred_expire=10,socket={root}/munge/munge.socket.2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MessageTimeout=30
KillWait=30
MinJobAge=600
InactiveLimit=0
JobRequeue=1
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start_cluster(
    nodes: tuple[str, ...] = ("omnimoe-n1", "omnimoe-n2"), cpus_per_node: int = 2, ports: int = 0
) -> SlurmCluster:
    """Start munged, slurmctld and one slurmd per node; return once every node is idle.

    ``ports`` is the first of the consecutive TCP ports used (slurmctld, then one per slurmd);
    0 picks a block from the process id so that parallel sessions do not collide.
    """
    # Not pytest's tmp_path: its parents are 0700, and munged (as the munge user) must reach
    # its socket and key; munged also rejects group/world-writable parents without sticky bit.
    root = Path(tempfile.mkdtemp(prefix="omnimoe-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root=root, nodes=list(nodes), cpus_per_node=cpus_per_node)
    try:
        _start(cluster, ports or 16000 + (os.getpid() % 300) * 10)
    except BaseException as exc:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"could not start the test SLURM cluster: {exc}\n{logs}") from exc
    return cluster


def _start(cluster: SlurmCluster, first_port: int) -> None:
    root = cluster.root
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    munge = pwd.getpwnam("munge")
    mdir = root / "munge"
    mdir.mkdir()
    mdir.chmod(0o755)  # clients need to reach the socket; the key itself is 0600
    subprocess.run(
        [_bin("mungekey"), "--create", f"--keyfile={mdir / 'munge.key'}"],
        check=True,
        capture_output=True,
    )
    for path in (mdir, mdir / "munge.key"):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    (mdir / "munge.key").chmod(0o600)
    subprocess.run(
        [
            "runuser",
            "-u",
            "munge",
            "--",
            _bin("munged"),
            f"--socket={mdir / 'munge.socket.2'}",
            f"--key-file={mdir / 'munge.key'}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
        text=True,
    )
    cluster.pids.append(_read_pid(mdir / "munged.pid"))

    hosts = HOSTS_FILE.read_text()
    for name in cluster.nodes:
        if not re.search(rf"(?m)^\S+\s+(.*\s)?{re.escape(name)}(\s|$)", hosts):
            cluster.hosts_lines.append(f"127.0.0.1 {name} {HOSTS_TAG}")
    if cluster.hosts_lines:
        with HOSTS_FILE.open("a") as f:
            f.write("".join(line + "\n" for line in cluster.hosts_lines))

    node_lines = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={first_port + 1 + i} "
        f"CPUs={cluster.cpus_per_node} RealMemory=4000 State=UNKNOWN"
        for i, name in enumerate(cluster.nodes)
    )
    cluster.conf.write_text(SLURM_CONF.format(root=root, ctld_port=first_port, nodes=node_lines))
    env = cluster.env()
    subprocess.run([_bin("slurmctld"), "-c", "-i", "-f", str(cluster.conf)], env=env, check=True)
    cluster.pids.append(_read_pid(root / "run" / "slurmctld.pid"))
    for name in cluster.nodes:
        (root / "spool" / name).mkdir()
        subprocess.run([_bin("slurmd"), "-N", name, "-f", str(cluster.conf)], env=env, check=True)
        cluster.pids.append(_read_pid(root / "run" / f"slurmd-{name}.pid"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        if all(states.get(n) == "idle" for n in cluster.nodes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"nodes not idle after 60 s: {states}")
