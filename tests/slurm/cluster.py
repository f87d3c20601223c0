"""A one-node Slurm cluster on this machine, for tests: install, configure, start, query, stop by pid.

    cluster = LocalSlurmCluster()          # a fresh temp dir holds config, state, logs, munge key
    cluster.start()                        # munged, slurmctld, slurmd; waits until the node is idle
    job = cluster.sbatch("slurm/aapo_70b.sh", ["--nodes=1", "--ntasks=2"], env={...})
    info = cluster.wait_job(job, {"COMPLETED"}, timeout=300)
    cluster.stop()                         # scancel, SIGTERM the daemons by pid file, check nothing is left

The recipe (docs/cluster.md) (proctrack/linuxproc, task/none, select/cons_tres, SlurmUser=root, one
node with $(nproc) CPUs, one partition). Everything the cluster writes lives in its own directory, with its
own munged socket and its own ports, so it neither needs nor disturbs a system-wide Slurm or munge.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

SLURM_PACKAGES = ("slurm-wlm", "munge")
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
# Daemons live in /usr/sbin, which a CI environment's PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
# States after which a job (or this incarnation of it) will not run again by itself.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


class SlurmUnavailable(RuntimeError):
    """Slurm (or another tool) is not installed and cannot be installed here; tests skip with this message."""


def which(binary: str) -> Optional[str]:
    """Absolute path of `binary` on PATH plus the sbin directories, or None."""
    return shutil.which(binary, path=_SEARCH_PATH)


def apt_install(packages: Sequence[str], binaries: Sequence[str], timeout: float = 900.0) -> None:
    """Install Debian `packages` unless every one of `binaries` is present; raise SlurmUnavailable if impossible."""
    missing = [b for b in binaries if which(b) is None]
    if not missing:
        return
    what = f"{', '.join(missing)} missing and Debian packages {' '.join(packages)} cannot be installed"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SlurmUnavailable(f"{what}: not running as root")
    apt = which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"{what}: no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    opts = ["-q", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
    for cmd in ([apt, *opts, "update"], [apt, *opts, "install", "-y", "--no-install-recommends", *packages]):
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{what}: `{' '.join(cmd)}` took longer than {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise SlurmUnavailable(f"{what}: `{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}")
    still = [b for b in binaries if which(b) is None]
    if still:
        raise SlurmUnavailable(f"installed {' '.join(packages)} but {', '.join(still)} still missing")


def ensure_slurm() -> None:
    """Install Debian's slurm-wlm and munge if any Slurm/munge binary is missing (root + apt-get needed)."""
    apt_install(SLURM_PACKAGES, SLURM_BINARIES)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show -o` one-line record -> {key: value}; values may contain spaces only in the last fields."""
    out: dict[str, str] = {}
    # Keys are CamelCase words (optionally with a ':' qualifier like TRES); a value runs to the next " Key=".
    for match in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", line.strip()):
        out[match.group(1)] = match.group(2)
    return out


@dataclass
class LocalSlurmCluster:
    """A private one-node Slurm cluster (munged + slurmctld + slurmd) rooted in a temp directory."""

    root: Optional[str] = None
    """Directory for config, state, spool, logs, pid files and the munge key; None = a new temp dir (removed at stop)."""
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    """CPUs of the node (the recipe: $(nproc))."""
    min_job_age_s: int = 900
    """MinJobAge: seconds a finished job stays queryable with scontrol."""
    partition: str = "debug"
    """Name of the single partition."""
    cred_expire_s: int = 10
    """Job credential lifetime (s); Slurm also holds a requeued job this long before it may start again."""

    def __post_init__(self) -> None:
        self._own_root = self.root is None
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="aapo-slurm-")
        # munged refuses a socket below a directory that not everyone may traverse.
        os.chmod(self.root, 0o755)
        self.hostname = socket.gethostname().split(".")[0]
        self.conf_path = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge-socket", "munge.socket")
        self.jobcomp_path = os.path.join(self.root, "log", "jobcomp.txt")
        self.pid_files = {  # start order; stopped in reverse
            "munged": os.path.join(self.root, "munge", "munged.pid"),
            "slurmctld": os.path.join(self.root, "run", "slurmctld.pid"),
            "slurmd": os.path.join(self.root, "run", "slurmd.pid"),
        }
        self.log_files = {
            "munged": os.path.join(self.root, "munge", "munged.log"),
            "slurmctld": os.path.join(self.root, "log", "slurmctld.log"),
            "slurmd": os.path.join(self.root, "log", "slurmd.log"),
        }
        self.started = False

    # ------------------------------------------------------------------ configuration

    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The calling environment with SLURM_CONF pointing at this cluster (plus `extra`)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf_path
        env["PATH"] = _SEARCH_PATH
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # a surrounding Slurm job's variables would leak into ours
        env.update(extra or {})
        return env

    def slurm_conf(self) -> str:
        """Text of slurm.conf for this cluster."""
        r = self.root
        ctld_port, slurmd_port = _free_port(), _free_port()
        lines = [
            "# written by tests/slurm/cluster.py: a private one-node test cluster",
            "ClusterName=aapotest",
            f"SlurmctldHost={self.hostname}({self.controller_address()})",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            f"MinJobAge={self.min_job_age_s}",
            "KillWait=30",
            "SlurmdTimeout=300",
            f"StateSaveLocation={r}/state",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmctldLogFile={self.log_files['slurmctld']}",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_path}",
            *self.node_conf_lines(),
        ]
        return "\n".join(lines) + "\n"

    def controller_address(self) -> str:
        """The address slurmctld is reached at (SlurmctldHost's)."""
        return "127.0.0.1"

    def node_conf_lines(self) -> list[str]:
        """slurm.conf lines of the slurmd side: its files, the node(s) and the partition."""
        return [
            f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmdLogFile={self.log_files['slurmd']}",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=NO",
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> "LocalSlurmCluster":
        """Write the config and munge key, start munged, slurmctld and slurmd, wait until the node is idle."""
        if self.started:
            return self
        ensure_slurm()
        r = self.root
        for sub in ("munge", "munge-socket", "state", "spool", "run", "log"):
            os.makedirs(os.path.join(r, sub), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o700)
        os.chmod(os.path.join(r, "munge-socket"), 0o755)
        key = os.path.join(r, "munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400), "wb") as fh:
            fh.write(os.urandom(1024))
        with open(self.conf_path, "w") as fh:
            fh.write(self.slurm_conf())
        self.started = True  # from here on, stop() cleans up whatever did start
        try:
            self._daemon("munged", [which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                                    f"--pid-file={self.pid_files['munged']}",
                                    f"--log-file={self.log_files['munged']}",
                                    f"--seed-file={os.path.join(r, 'munge', 'munged.seed')}"])
            self._daemon("slurmctld", [which("slurmctld"), "-i"])  # -i: ignore (absent) saved state
            self.start_nodes()
            self._wait_idle(timeout)
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def start_nodes(self) -> None:
        """Start the slurmd(s)."""
        self._daemon("slurmd", [which("slurmd")])

    def _daemon(self, name: str, argv: list) -> None:
        """Run a self-daemonizing `argv` and wait for its pid file; raise with its log on failure."""
        proc = subprocess.run(argv, env=self.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.log_tail(name)}")
        deadline = time.monotonic() + 20
        while self.pid(name) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {self.pid_files[name]}\n{self.log_tail(name)}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state and set(state.split()) == {"idle"}:
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.hostname} not idle after {timeout:.0f} s (sinfo: {state!r})\n"
                           f"{self.log_tail('slurmctld')}\n{self.log_tail('slurmd')}")

    def pid(self, name: str) -> Optional[int]:
        """Pid recorded in daemon `name`'s pid file, or None."""
        try:
            with open(self.pid_files[name]) as fh:
                text = fh.read().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def stop(self, check: bool = True, timeout: float = 60.0) -> list[str]:
        """Cancel all jobs, SIGTERM the daemons by pid file (SIGKILL after `timeout`), return leftover processes.

        With `check`, raise RuntimeError if any process of this cluster (daemon, slurmstepd, job task) is still
        alive afterwards.
        """
        if not self.started:
            return []
        if self.pid("slurmctld") is not None:
            self.run(["scancel", "--full", f"--partition={self.partition}"], check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                q = self.run(["squeue", "-h", "-o", "%i %T"], check=False)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(list(self.pid_files)):
            pid = self.pid(name)
            if pid is None:
                continue
            _terminate(pid, timeout)
        leftovers = [f"{pid}: {cmd}" for pid, cmd in self.processes()]
        for pid, _ in self.processes():
            _terminate(pid, 10.0)
        self.started = False
        if self._own_root and not leftovers:
            shutil.rmtree(self.root, ignore_errors=True)
        if check and leftovers:
            raise RuntimeError("processes of the test Slurm cluster still running after stop: " + "; ".join(leftovers))
        return leftovers

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of live processes belonging to this cluster: started with its SLURM_CONF or root."""
        found = []
        marker_env = f"SLURM_CONF={self.conf_path}".encode()
        marker_root = self.root.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read()
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if b") Z " in stat:  # a zombie is dead already; its parent just has not reaped it
                continue
            if marker_env in environ.split(b"\0") or marker_root in cmdline:
                found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
        return found

    def log_tail(self, name: str, lines: int = 20) -> str:
        """Last `lines` lines of daemon `name`'s log (for error messages)."""
        try:
            with open(self.log_files[name], errors="replace") as fh:
                tail = fh.read().splitlines()[-lines:]
        except FileNotFoundError:
            return f"({name}: no log)"
        return f"--- {name} log ---\n" + "\n".join(tail)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs

    def run(self, argv: Sequence[str], check: bool = True, env: Optional[Mapping[str, str]] = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; with `check`, raise on a non-zero exit."""
        proc = subprocess.run(list(argv), env=self.env(env), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str, args: Iterable[str] = (), env: Optional[Mapping[str, str]] = None,
               script_args: Iterable[str] = (), cwd: Optional[str] = None) -> int:
        """Submit `script` with sbatch `args` (the job inherits `env` on top of ours); returns the job id."""
        argv = ["sbatch", "--parsable", *args, script, *script_args]
        proc = subprocess.run(argv, env=self.env(env), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` record of `job_id` as a dict (JobState, ExitCode, Restarts, ...)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return parse_scontrol_record(proc.stdout.strip().splitlines()[0])

    def wait_job(self, job_id: int, states: Iterable[str] = FINAL_STATES, timeout: float = 300.0,
                 poll: float = 1.0) -> dict[str, str]:
        """Poll until the job's JobState is in `states`; returns the record. Raises TimeoutError with it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in wanted:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: "
                           f"JobState={info.get('JobState')} Reason={info.get('Reason')}")

    def completions(self, job_id: int) -> list[dict[str, str]]:
        """Records jobcomp/filetxt wrote for `job_id`, oldest first: one per end of a run (requeue or finish)."""
        try:
            with open(self.jobcomp_path) as fh:
                records = [parse_scontrol_record(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in records if r.get("JobId") == str(job_id)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return b") Z " not in fh.read()
    except OSError:
        return False


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM `pid`, wait up to `timeout` s for it to exit, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
