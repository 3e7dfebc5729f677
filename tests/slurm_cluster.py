"""A real, throw-away Slurm cluster on this machine, for the tests.

``start_cluster(workdir)`` makes sure MUNGE runs, writes a ``slurm.conf`` under ``workdir``
(every state, spool, pid and log path lives there), starts ``slurmctld`` and one ``slurmd``
per node (all nodes share this host, each on its own port, ``CPUs=1``), exports
``SLURM_CONF`` so ``sbatch``/``squeue``/``scancel`` and submitit find the cluster, and waits
until ``sinfo -N`` shows every node idle.  ``SlurmCluster.stop()`` undoes all of it.

Needs root (``SlurmUser=root``) and the Debian packages ``slurmctld slurmd slurm-client
munge`` (see ``scripts/install_slurm.sh``).

There is no slurmdbd, so the real ``sacct`` only says "accounting storage is disabled".
submitit learns a job's state from ``sacct`` alone: without it a job that ends without a
result (cancelled, killed, failed before pickling) is never ``done()`` and ``result()``
waits forever.  So by default the cluster puts a small ``sacct`` stand-in first on PATH
(``python tests/slurm_cluster.py sacct ...``, see :func:`fake_sacct`) that answers from
``scontrol show job``; finished jobs stay visible there for MinJobAge (600 s).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_DIRS = tuple(map(Path, ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge")))
#: One JSON file per live test session: lets a later session clean up after a crashed one.
REGISTRY = Path(tempfile.gettempdir()) / "msscale-slurm-clusters"
NODE_MEMORY_MB = 4000
START_TIMEOUT_S = 60.0

SLURM_CONF_TEMPLATE = """\
# Written by tests/slurm_cluster.py: a throw-away cluster of {nodes} node(s) on one host.
ClusterName=msscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MaxArraySize=100001
MaxJobCount=100000
MinJobAge=600
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=5
InactiveLimit=0
KillWait=2
WaitTime=0
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/run/slurmctld.pid
SlurmdPidFile={workdir}/run/slurmd-%n.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = (
    "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
    "CPUs=1 RealMemory={mem} State=UNKNOWN"
)


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` joined by spaces ('' if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _read_pid(pidfile: Path) -> int | None:
    """The PID in ``pidfile``, or None when it is missing or unreadable."""
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, wait for it to exit, SIGKILL it if it outlives ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
    log.warning("process %d did not exit after SIGKILL", pid)


def _stop_proc(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child we spawned: SIGTERM, wait (reaping it), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _spawn(argv: list[str], out: Path, user: pwd.struct_passwd | None = None) -> subprocess.Popen:
    """Start a foreground daemon in its own session, its stdout/stderr going to ``out``."""
    ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    with out.open("ab") as sink:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True, **ids,
        )


def _tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path`` (a note if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def munge_works() -> bool:
    """Whether a munged is running and answering (``munge -n | unmunge`` succeeds)."""
    if not shutil.which("munge") or not shutil.which("unmunge"):
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True)
        subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _prepare_munge() -> None:
    """Create MUNGE's key (1024 random bytes, munge:munge 0400) and dirs, if missing."""
    user = pwd.getpwnam("munge")
    for directory in MUNGE_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, user.pw_uid, user.pw_gid)
    MUNGE_DIRS[0].chmod(0o700)
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size < 1024:
        MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    MUNGE_KEY.chmod(0o400)


def ensure_munge(logdir: Path, timeout: float = 15.0) -> subprocess.Popen | None:
    """Make sure munged answers; return its process if this call started it, else None.

    A munged that already answers is reused.  Ours runs in the foreground (``-F``) as a
    child of this process, so that it is reaped when stopped (PID 1 here reaps nothing).
    """
    if munge_works():
        log.info("reusing the running munged")
        return None
    _prepare_munge()
    user = pwd.getpwnam("munge")
    proc = _spawn(["/usr/sbin/munged", "-F", "--force"], logdir / "munged.out", user=user)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if munge_works():
            log.info("started munged (pid %d)", proc.pid)
            return proc
        time.sleep(0.2)
    _stop_proc(proc)
    raise RuntimeError(f"munged does not answer:\n{_tail(logdir / 'munged.out')}")


def _registry_entries() -> list[Path]:
    """The registry files of all sessions that started a cluster and did not stop it."""
    return sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []


def clean_leftovers() -> None:
    """Stop daemons of clusters whose owning process died without calling ``stop()``."""
    for entry in _registry_entries():
        try:
            info = json.loads(entry.read_text())
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)
            continue
        if _alive(info.get("owner", -1)):
            continue  # a session running right now, beside this one: leave it alone
        for pid in info.get("pids", []):
            if _alive(pid) and info["conf"] in _cmdline(pid):
                log.warning("killing leftover Slurm daemon %d (%s)", pid, _cmdline(pid))
                _kill_and_wait(pid)
        entry.unlink(missing_ok=True)


def slurm_cmd(*args: str, timeout: float = 30.0, check: bool = True) -> str:
    """Run a Slurm client command (SLURM_CONF from os.environ) and return its stdout."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


#: sacct field -> ``scontrol show job`` key, for the fields the stand-in knows.
SACCT_FIELDS = {
    "JobIDRaw": "JobId", "JobName": "JobName", "State": "JobState", "NodeList": "NodeList",
    "ExitCode": "ExitCode", "Partition": "Partition", "Start": "StartTime",
    "End": "EndTime", "Elapsed": "RunTime", "AllocNodes": "NumNodes",
}


def _scontrol_jobs(job_id: str) -> list[dict[str, str]]:
    """Every record ``scontrol -o show job ID`` prints (one per array task), as dicts."""
    out = slurm_cmd("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
    return [
        dict(w.split("=", 1) for w in line.split() if "=" in w) for line in out.splitlines()
    ]


def _sacct_row(job: dict[str, str], fields: list[str]) -> list[str]:
    """One sacct-style row: JobID as ``ID``, ``ARRAY_TASK`` or ``ARRAY_[RANGE]``."""
    task = job.get("ArrayTaskId")
    job_id = job.get("JobId", "")
    if job.get("ArrayJobId") and task:
        task = task.split("%")[0]
        job_id = f"{job['ArrayJobId']}_{task if task.isdigit() else f'[{task}]'}"
    values = {"JobID": job_id, **{f: job.get(k, "") for f, k in SACCT_FIELDS.items()}}
    if values["NodeList"] in ("", "(null)"):
        values["NodeList"] = "None assigned"
    return [values.get(f, "") for f in fields]


def fake_sacct(argv: list[str]) -> int:
    """A stand-in for ``sacct -o F1,F2 --parsable2 -j ID ...`` answering from scontrol.

    Knows -o/--format, -j/--jobs, -P/--parsable2, -p/--parsable, -n/--noheader and
    -X/--allocations (steps are never listed); anything else is an error, as is no -j.
    """
    fields, job_ids, sep, end, header = ["JobID", "JobName", "State"], [], "|", "", True
    args = iter(argv)
    for arg in args:
        opt, _, value = arg.partition("=")
        if opt in ("-o", "--format"):
            fields = (value or next(args, "")).split(",")
        elif opt in ("-j", "--jobs"):
            job_ids += (value or next(args, "")).split(",")
        elif opt in ("-P", "--parsable2", "-p", "--parsable"):
            end = "|" if opt in ("-p", "--parsable") else ""
        elif opt in ("-n", "--noheader"):
            header = False
        elif opt not in ("-X", "--allocations"):
            sys.stderr.write(f"sacct (test stand-in): unsupported option {arg}\n")
            return 1
    if not job_ids:
        sys.stderr.write("sacct (test stand-in): needs -j JOBID\n")
        return 1
    rows = [fields] if header else []
    for job_id in dict.fromkeys(job_ids):
        rows += [_sacct_row(job, fields) for job in _scontrol_jobs(job_id)]
    sys.stdout.write("".join(sep.join(row) + end + "\n" for row in rows))
    return 0


def _write_sacct_shim(bindir: Path) -> Path:
    """Write ``bindir/sacct`` that runs :func:`fake_sacct`; return ``bindir``."""
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "sacct"
    here = Path(__file__).resolve()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{here}" sacct "$@"\n')
    shim.chmod(0o755)
    return bindir


@dataclass
class SlurmCluster:
    """A running test cluster; see :func:`start_cluster`."""

    workdir: Path
    conf: Path
    nodes: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    munged: subprocess.Popen | None = None
    _old_env: dict[str, str | None] = field(default_factory=dict)
    _registry_file: Path | None = None

    @property
    def logdir(self) -> Path:
        """Where the daemons' logs (``*.log``) and stdout/stderr (``*.out``) go."""
        return self.workdir / "log"

    @property
    def pidfiles(self) -> list[Path]:
        """The pid files of slurmctld and of each node's slurmd."""
        run = self.workdir / "run"
        return [run / "slurmctld.pid"] + [run / f"slurmd-{node}.pid" for node in self.nodes]

    def logs_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon's output (``*.out``: a copy of its log plus
        anything written before the log file opened), for error messages."""
        logs = sorted(self.logdir.glob("*.out"))
        return "\n".join(f"--- {p.name} ---\n{_tail(p, lines)}" for p in logs)

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` as ``sinfo -N`` reports them."""
        out = slurm_cmd("sinfo", "-N", "-h", "-o", "%N %T", check=False, timeout=10)
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def job_state(self, job_id: str) -> str:
        """A job's state from ``scontrol`` (e.g. RUNNING, COMPLETED, CANCELLED); '' if unknown.

        Finished jobs stay visible for MinJobAge (600 s).  For an array task pass ``ID_TASK``.
        """
        out = slurm_cmd("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return ""

    def wait_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every node is idle; RuntimeError with the logs' tail otherwise."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}:
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"Slurm daemon(s) {dead} exited\n{self.logs_tail()}")
            if any(state.startswith("inval") for state in states.values()):
                break  # the node's config does not match this host: waiting will not help
            time.sleep(0.25)
        reason = self.node_reasons()
        raise RuntimeError(f"Slurm nodes not idle: {states} {reason}\n{self.logs_tail()}")

    def node_reasons(self) -> str:
        """Why nodes are down/drained/invalid, as ``sinfo -R`` says ('' if none)."""
        return slurm_cmd("sinfo", "-R", "-h", "-o", "%N: %E;", check=False, timeout=10).strip()

    def cancel_all_jobs(self, timeout: float = 10.0) -> None:
        """scancel every job of this cluster and wait (up to ``timeout``) for the queue to empty."""
        jobs = slurm_cmd("squeue", "-h", "-o", "%A", check=False, timeout=10).split()
        if not jobs:
            return
        slurm_cmd("scancel", *sorted(set(jobs)), check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not slurm_cmd("squeue", "-h", "-o", "%A", check=False, timeout=10).split():
                return
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel jobs, stop slurmd/slurmctld (and munged if we started it), restore env."""
        if any(p.poll() is None for p in self.procs):
            self.cancel_all_jobs()
        for pid in filter(None, map(_read_pid, reversed(self.pidfiles))):
            if _alive(pid) and str(self.conf) in _cmdline(pid):
                _kill_and_wait(pid)
        for proc in reversed(self.procs):
            _stop_proc(proc)  # reaps them; kills any whose pid file was missing
        if self._registry_file is not None:
            self._registry_file.unlink(missing_ok=True)
        if self.munged is not None and not _registry_entries():
            _stop_proc(self.munged)  # only when no other live session may rely on it
        for name, value in self._old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        log.info("Slurm cluster in %s stopped", self.workdir)

    def start_daemon(self, argv: list[str], name: str) -> None:
        """Spawn a foreground Slurm daemon and record it for :meth:`stop` and later cleanup."""
        self.procs.append(_spawn(argv, self.logdir / f"{name}.out"))
        REGISTRY.mkdir(parents=True, exist_ok=True)
        self._registry_file = REGISTRY / f"{os.getpid()}-{id(self)}.json"
        pids = [p.pid for p in self.procs]
        info = {"owner": os.getpid(), "conf": str(self.conf), "pids": pids}
        self._registry_file.write_text(json.dumps(info))


def write_conf(workdir: Path, nodes: list[str], node_memory_mb: int = NODE_MEMORY_MB) -> Path:
    """Write slurm.conf (fresh ports each time) and create its directories; return its path."""
    for sub in ("state", "run", "log", *(f"spool/{n}" for n in nodes)):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    for stale in (workdir / "run").glob("*.pid"):
        stale.unlink()
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = _free_ports(1 + len(nodes))
    node_lines = "\n".join(
        NODE_LINE.format(name=n, host=host, port=p, mem=node_memory_mb)
        for n, p in zip(nodes, node_ports, strict=True)
    )
    conf = workdir / "slurm.conf"
    conf.write_text(SLURM_CONF_TEMPLATE.format(
        nodes=len(nodes), host=host, ctld_port=ctld_port, workdir=workdir,
        node_lines=node_lines, node_list=",".join(nodes),
    ))
    return conf


def _export(cluster: SlurmCluster, name: str, value: str) -> None:
    """Set os.environ[name], remembering the old value for :meth:`SlurmCluster.stop`."""
    cluster._old_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def start_cluster(
    workdir: Path, nodes: int = 2, node_memory_mb: int = NODE_MEMORY_MB, sacct_shim: bool = True
) -> SlurmCluster:
    """Start a Slurm cluster of ``nodes`` one-CPU nodes (node1..nodeN) in ``workdir``.

    Each node has ``node_memory_mb`` of RealMemory; memory is not a consumable resource
    (CR_Core), so a job may ask for up to that much (submitit's ``mem_gb`` <= 3 by default).
    With ``sacct_shim`` the sacct stand-in (see the module doc) goes first on PATH.

    Exports SLURM_CONF in os.environ.  Raises RuntimeError (with the daemon logs' tail)
    when a daemon fails or the nodes are not idle within 60 s; a half-started cluster
    is stopped first.
    """
    for tool in ("slurmctld", "slurmd", "sinfo", "munged"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            raise RuntimeError(f"{tool} not found: run scripts/install_slurm.sh")
    clean_leftovers()
    workdir = Path(workdir).resolve()
    names = [f"node{i}" for i in range(1, nodes + 1)]
    conf_path = write_conf(workdir, names, node_memory_mb)
    cluster = SlurmCluster(workdir=workdir, conf=conf_path, nodes=names)
    _export(cluster, "SLURM_CONF", str(cluster.conf))
    if sacct_shim:
        bindir = _write_sacct_shim(workdir / "bin")
        _export(cluster, "PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    started = time.monotonic()
    conf = str(cluster.conf)
    try:
        cluster.munged = ensure_munge(cluster.logdir)
        cluster.start_daemon(["slurmctld", "-D", "-c", "-f", conf], "slurmctld")
        for node in names:
            cluster.start_daemon(["slurmd", "-D", "-f", conf, "-N", node], f"slurmd-{node}")
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    log.info("Slurm cluster %s up in %.1f s (%s)", names, time.monotonic() - started, conf)
    return cluster


def main(argv: list[str]) -> int:
    """``python slurm_cluster.py sacct ARGS``: the sacct stand-in (used by the PATH shim)."""
    if argv[:1] == ["sacct"]:
        return fake_sacct(argv[1:])
    sys.stderr.write("usage: slurm_cluster.py sacct [sacct options]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
