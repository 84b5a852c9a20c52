"""A real single-node Slurm for tests: munged + slurmctld + slurmd, private to one temp dir.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in a fresh directory under
the system temp dir; nothing in /etc is changed. Commands reach this cluster through ``SLURM_CONF``
(see ``SlurmCluster.env``). Debian's ``slurm-wlm`` and ``munge`` are installed with apt-get when
missing and we are root (the CI machine); elsewhere the tests are skipped with the reason.

Usage in a test module::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_installed() -> str | None:
    """Install slurm-wlm + munge if missing (root only); returns why Slurm cannot be had, or None."""
    if all(_which(d) for d in DAEMONS) and _which("sbatch"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge not installed and cannot apt-get them (not root or not Debian)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=icptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self) -> None:
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpus = os.cpu_count() or 1
        mem = max(256, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2**20 // 2)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, root=root, cpus=cpus, mem=mem,
            ctld_port=_free_port(), slurmd_port=_free_port()))
        # munged refuses to run as root unless forced; everything else is private to `root`.
        self._spawn([_which("munged"), "-F", "--force", f"--socket={root}/munge.sock",
                     f"--key-file={key}", f"--pid-file={root}/munged.pid",
                     f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"], "munged")
        self._wait(lambda: (root / "munge.sock").exists(), "munged socket", 10)
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0
                   and "UP" in self.run("scontrol", "ping", check=False).stdout, "slurmctld", 30)
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd")
        self._wait(self._node_idle, "slurmd (node idle)", 40)

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        return out.startswith(("idle", "mix", "alloc"))

    def _spawn(self, cmd: list, name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait(self, ok, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        raise RuntimeError(f"{what} did not come up; logs:\n{self.logs()}")

    def logs(self, tail: int = 15) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        # Jobs of this private cluster first (a failed test may leave one running), then daemons.
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                end = time.monotonic() + 15
                while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < end:
                    time.sleep(0.5)
        for proc in reversed(self.procs):  # only the daemons this object started, by their pid
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ------------------------------------------------------------------ job helpers for tests

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} stayed {state!r}, wanted {states}; logs:\n{self.logs()}")


@pytest.fixture(scope="session")
def slurm_cluster():
    why = ensure_installed()
    if why:
        pytest.skip(f"no Slurm: {why}")
    # A short path: munge's unix socket path must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="icp-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        cluster.stop()
        pytest.skip(f"Slurm could not start here: {str(err).splitlines()[0]}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # manual check: python -m tests.slurm_cluster
    c = SlurmCluster(Path(tempfile.mkdtemp(prefix="icp-slurm-")))
    t0 = time.monotonic()
    try:
        c.start()
        print(f"up in {time.monotonic() - t0:.1f}s at {c.root}")
        print(c.run("sinfo").stdout)
    finally:
        c.stop()
