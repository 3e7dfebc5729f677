"""A certification run as a submitit job array: plan the shards, submit the missing ones,
watch them, merge.

The run directory holds .lock (held by the command writing it, so one run at a time),
config.yaml (the resolved config the shards were made with, recorded once the run starts),
counts/ (one file per finished shard, progress files of unfinished ones), logs/ (submitit's
pickles and each task's stdout/stderr; jobs.json, the job of every submitted shard: a Slurm
job id, or the pid of a local job) and, after the merge, counts.npz and the results.

Re-running the same command is always safe: a shard whose file exists is done; a shard whose
Slurm job is still queued or running (after --no-wait, or a stopped wait) is waited for, not
submitted again; only the other shards are submitted, and each resumes from its progress file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import submitit
import yaml

from msscale.atomic import atomic_write_text
from msscale.certify.plan import plan_shard, shard_files, shard_path
from msscale.certify.schema import SEQUENTIAL_KEYS
from msscale.cluster import CLUSTERS, submission_errors
from msscale.errors import UserError
from msscale.logs import setup_logging
from msscale.paths import output_dir, regular_file, run_lock

log = logging.getLogger(__name__)

DONE, FAILED, QUEUED = "done", "failed", "queued"
#: Slurm states of a job that will still run (not one that is ending, e.g. COMPLETING).
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
         "RESIZING", "SUSPENDED"}
#: Order of the states in the live summary; states not listed come before "failed".
STATE_ORDER = (DONE, "running", "completing", "requeued", "pending", QUEUED, FAILED)


class ShardTask(submitit.helpers.Checkpointable):
    """The callable each array task runs: one shard. On preemption or timeout submitit calls
    `checkpoint`, which (inherited) resubmits the same call; the shard then resumes from its
    progress file, so no draw is repeated or lost."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self, shard_id: int, num_shards: int, sample_splits: int) -> str:
        import torch

        from msscale.certify.shard import run_shard

        setup_logging()
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or self.cfg["slurm"]["cpus_per_task"]
        torch.set_num_threads(int(threads))
        return str(run_shard(self.cfg, shard_id, num_shards, sample_splits))


# ----------------------------------------------------------------------------- run directory


CONFIG = "config.yaml"


def check_run_dir(cfg: dict) -> Path:
    """The run directory `out` may take this run: a writable directory, and not one holding
    work (shard or progress files, Slurm jobs still queued) made with another config. A
    config.yaml whose run computed nothing (it failed first) is no run: it is replaced.
    Call it with the directory's lock held when it is followed by writing."""
    out = output_dir(cfg["out"], "out")
    saved = out / CONFIG
    if not saved.exists():
        return out
    changed = _config_changes(saved, cfg)
    if not changed:
        return out
    work = _work_in(out)
    if work is None:
        log.warning("%s: replacing %s (%s): its run computed nothing", out, saved, changed[0])
        return out
    raise UserError(
        f"{out} holds a run made with another config ({saved}): {changed[0]}; "
        "use another --out, or remove that directory to start over"
    )


def record_config(cfg: dict) -> None:
    """Write the config into the run directory: the run has started with it."""
    from msscale.config import save_config

    save_config(cfg, Path(cfg["out"]) / CONFIG)


def _config_changes(saved: Path, cfg: dict) -> list[str]:
    """How the config recorded in `saved` differs from `cfg` where it matters for counts."""
    try:
        previous = yaml.safe_load(regular_file(saved, "config").read_text())
        return _differences(_sampling_view(previous), _sampling_view(cfg))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError, KeyError):
        return [f"{saved.name} is not a readable config"]


def _work_in(out: Path) -> str | None:
    """What in `out` was computed or is being computed: a counts file, a queued Slurm job."""
    files = sorted((out / "counts").glob("shard-*.npz"))
    if files:
        return str(files[0])
    recorded = _read_jobs(out)
    if recorded.get("cluster") != "slurm" or not recorded.get("jobs"):
        return None
    try:
        alive = _alive_slurm_jobs() & set(recorded["jobs"].values())
    except UserError:
        return "Slurm jobs whose state squeue cannot tell"
    return f"Slurm job {sorted(alive)[0]}" if alive else None


def _sampling_view(cfg: dict) -> dict:
    """The parts of a config that change the counts, or may through floating-point rounding
    (precision, memory format, compilation); not resources, batch size, flushes or out."""
    ignored = ("batch_size", "flush_every")
    if cfg["smoothing"].get("schedule") != "sequential":
        ignored += SEQUENTIAL_KEYS  # they change nothing in a full or cascade run
    smoothing = {k: v for k, v in cfg["smoothing"].items() if k not in ignored}
    keys = ("seed", "precision", "channels_last", "compile", "denoiser", "classifier", "data")
    return {k: cfg.get(k) for k in keys} | {"smoothing": smoothing}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key.sub is A there and B here' for every leaf where two nested dicts differ."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key} is {a!r} there and {b!r} here")
    return lines


def _refuse_other_split(out: Path, shards: int, sample_splits: int) -> None:
    """Shard files of a run split another way cannot be resumed or merged with this one."""
    from msscale.certify.counts import load_counts

    total = shards * sample_splits
    files = sorted((out / "counts").glob("shard-*-of-*.npz"))  # progress files too
    other = [p for p in files if f"-of-{total:05d}." not in p.name]
    finished = [p for (_, count), p in shard_files(out).items() if count == total]
    if not other and finished:
        splits = load_counts(finished[0]).meta.get("sample_splits", 1)
        other = [finished[0]] if splits != sample_splits else []
    if other:
        raise UserError(
            f"{out} holds shards of a run split another way (e.g. {other[0]}); "
            "use the same --shards and --sample-splits as that run, or another --out"
        )


def missing_shards(out: Path, num_shards: int) -> list[int]:
    """Shard ids whose final file is not there (never started, unfinished or failed)."""
    return [t for t in range(num_shards) if not shard_path(out, t, num_shards).is_file()]


def _jobs_file(out: Path) -> Path:
    return out / "logs" / "jobs.json"


def _read_jobs(out: Path) -> dict:
    """logs/jobs.json, or {} when it is missing or unreadable (it only saves waiting)."""
    path = _jobs_file(out)
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("ignoring %s: not JSON", path)
        return {}
    if not isinstance(recorded, dict) or not isinstance(recorded.get("jobs", {}), dict):
        log.warning("ignoring %s: not a jobs record", path)
        return {}
    return recorded


def _record_jobs(out: Path, cluster: str, total: int, jobs: dict) -> None:
    """Remember the job of each submitted shard (a Slurm job id, or the pid of a local job's
    controller process), for a later run of the same command and for people."""
    path = _jobs_file(out)
    recorded = _read_jobs(out)
    if (recorded.get("cluster"), recorded.get("shards")) != (cluster, total):
        recorded = {"cluster": cluster, "shards": total, "jobs": {}}
    recorded["jobs"].update({str(shard): job.job_id for shard, job in jobs.items()})
    atomic_write_text(path, json.dumps(recorded, indent=1) + "\n")


def queued_slurm_jobs(out: Path, total: int, shards: list[int]) -> dict:
    """{shard: SlurmJob} of `shards` whose recorded job is still in the Slurm queue."""
    recorded = _read_jobs(out)
    if (recorded.get("cluster"), recorded.get("shards")) != ("slurm", total):
        return {}
    alive = _alive_slurm_jobs()
    return {
        shard: submitit.SlurmJob(out / "logs", job_id)
        for shard, job_id in ((int(s), j) for s, j in recorded["jobs"].items())
        if shard in shards and job_id in alive
    }


def _alive_slurm_jobs() -> set[str]:
    """Ids of this user's Slurm jobs (array tasks one by one) that will still run."""
    try:
        squeue = subprocess.run(
            ["squeue", "--me", "--array", "--noheader", "--format=%i %T"],
            capture_output=True, text=True, timeout=60,
        )
    except FileNotFoundError:
        raise UserError("squeue not found: no Slurm here? (use --cluster local)") from None
    if squeue.returncode != 0:
        raise UserError(f"squeue failed: {squeue.stderr.strip()}")
    rows = (line.split() for line in squeue.stdout.splitlines())
    return {row[0] for row in rows if len(row) == 2 and row[1] in ALIVE}


# ------------------------------------------------------------------------------- submission


class ArrayRun:
    """The shards of one command and their jobs.

    Slurm runs an array at most `array_parallelism` tasks at a time by itself; the local
    executor would start every job at once, so for it at most `limit` jobs run and the other
    shards wait in `queue` until `start` is called again.
    """

    def __init__(self, cluster: str, out: Path, executor, task: ShardTask, total: int,
                 sample_splits: int, limit: int | None = None):
        self.cluster, self.out, self.executor, self.task = cluster, out, executor, task
        self.total, self.sample_splits, self.limit = total, sample_splits, limit
        self.jobs: dict = {}
        self.queue: list[int] = []

    def submit(self, shards: list[int]) -> dict:
        """Queue `shards` and start what may start now; returns the jobs just started."""
        self.queue += shards
        return self.start()

    def start(self) -> dict:
        """Submit queued shards: all of them, or up to `limit` running local jobs."""
        free = len(self.queue)
        if self.limit is not None:
            states = self.states()
            running = sum(state not in (DONE, FAILED, QUEUED) for state in states.values())
            free = max(0, self.limit - running)
        batch, self.queue = self.queue[:free], self.queue[free:]
        if not batch:
            return {}
        n = len(batch)
        with submission_errors(self.cluster):
            jobs = self.executor.map_array(
                self.task, batch, [self.total] * n, [self.sample_splits] * n
            )
        started = dict(zip(batch, jobs, strict=True))
        self.jobs.update(started)
        if self.cluster != "debug":  # debug jobs run in this process, when waited for
            _record_jobs(self.out, self.cluster, self.total, started)
        return started

    def states(self) -> dict[int, str]:
        """Every shard's state: done (its file exists), failed (its job ended without the
        file), queued (not submitted yet) or the job's own state in lower case."""
        states = {shard: QUEUED for shard in self.queue}
        for shard, job in self.jobs.items():
            ended = job.done()  # first: a job writes its shard file before it ends
            if shard_path(self.out, shard, self.total).is_file():
                states[shard] = DONE
            elif ended:
                states[shard] = FAILED
            else:
                states[shard] = (job.state.split() or ["unknown"])[0].lower()
        return states

    def failure(self, shard: int) -> str:
        """Why the job of `shard` ended without its shard file, and where its log is."""
        job = self.jobs[shard]
        reason = f"stopped (state {job.state}) before writing its shard file"
        if job.paths.result_pickle.exists():
            outcome, value = submitit.core.utils.pickle_load(job.paths.result_pickle)
            if outcome == "error":  # a traceback: its last line, less the exception's name
                reason = re.sub(r"^msscale\.[\w.]+: ", "", _last_line(str(value)))
        return f"shard {shard} (job {job.job_id}): {reason} (log: {job.paths.stderr})"


def _last_line(trace: str) -> str:
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def submit_array(cfg: dict, cluster: str, shards: int, sample_splits: int,
                 parallelism: int | None = None) -> ArrayRun:
    """Submit the shards that are neither finished nor still queued on Slurm."""
    from msscale.cluster import make_executor

    total = shards * sample_splits
    plan_shard(cfg, 0, 0, total, sample_splits)  # refuse a bad split before submitting
    out = check_run_dir(cfg)
    _refuse_other_split(out, shards, sample_splits)
    # What every task would fail on is refused here, before a task is spent on it.
    _check_model_paths(cfg)
    _verify_data(cfg)
    record_config(cfg)
    with submission_errors(cluster):
        executor = make_executor(cluster, out / "logs", cfg["slurm"], name="msscale-certify",
                                 array_parallelism=parallelism)
    limit = None
    if cluster == "local":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        limit = parallelism or max(1, (cpus or 1) // cfg["slurm"]["cpus_per_task"])
    run = ArrayRun(cluster, out, executor, ShardTask(cfg), total, sample_splits, limit)
    todo = missing_shards(out, total)
    if cluster == "slurm" and todo:
        run.jobs = queued_slurm_jobs(out, total, todo)
        todo = [shard for shard in todo if shard not in run.jobs]
    log.info(
        "%s: %d shards; %d already done, %d still queued from an earlier submission, %d to submit",
        out, total, total - len(todo) - len(run.jobs), len(run.jobs), len(todo),
    )
    if todo:
        log.info("submitting shards %s to %s", id_ranges(todo), cluster)
        started = run.submit(todo)
        if cluster == "slurm":
            array_id = next(iter(started.values())).job_id.split("_")[0]
            log.info("Slurm array %s; logs in %s", array_id, out / "logs")
    return run


def _check_model_paths(cfg: dict) -> None:
    """The model paths name a directory and a file (loading them is left to the tasks)."""
    if not Path(cfg["denoiser"]["path"]).is_dir():
        raise UserError(f"denoiser.path {cfg['denoiser']['path']} is not a directory")
    if cfg["classifier"]["checkpoint"] is not None:
        regular_file(cfg["classifier"]["checkpoint"], "classifier.checkpoint")


def _verify_data(cfg: dict) -> None:
    """The data shards the run reads match their recorded sha256 (each task checks its own
    again: the files may change while the array waits in the queue)."""
    from msscale.data.dataset import open_dataset, select_indices

    dataset = open_dataset(cfg["data"]["shards"])
    dataset.verify(select_indices(dataset.count, cfg["data"]["skip"], cfg["data"]["max_images"]))


def id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    spans: list[list[int]] = []
    for i in sorted(ids):
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ---------------------------------------------------------------------------------- waiting


def summarize(states: dict[int, str]) -> str:
    """'2 done, 1 running, 4 pending (of 7)': the shards of this command by state."""
    counts = Counter(states.values())
    order = {name: i for i, name in enumerate(STATE_ORDER)}
    names = sorted(counts, key=lambda s: (order.get(s, len(order) - 1.5), s))
    return ", ".join(f"{counts[s]} {s}" for s in names) + f" (of {len(states)})"


def wait_for(run: ArrayRun, poll_s: float = 2.0, heartbeat_s: float = 600.0) -> None:
    """Start queued shards and log a summary of the states whenever it changes (and every
    `heartbeat_s`) until every job has ended; a shard without its file is a UserError."""
    started = time.monotonic()
    last, last_time = "", 0.0
    while True:
        run.start()
        states = run.states()
        line = summarize(states)
        now = time.monotonic()
        if line != last or now - last_time >= heartbeat_s:
            log.info("shards: %s after %s", line, _elapsed(now - started))
            last, last_time = line, now
        if not run.queue and all(s in (DONE, FAILED) for s in states.values()):
            break
        time.sleep(poll_s)
    failed = sorted(shard for shard, state in states.items() if state == FAILED)
    if failed:
        raise UserError(
            f"{len(failed)} of {len(states)} shards failed (shards {id_ranges(failed)}); "
            f"first: {run.failure(failed[0])}. Finished shards are kept: fix the cause and "
            "run the same command again"
        )


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def run_array(cfg: dict, cluster: str, shards: int, sample_splits: int = 1,
              parallelism: int | None = None, wait: bool = True, poll_s: float = 2.0):
    """The whole command: submit what is missing, wait, merge. Returns the merged Counts
    (None with wait=False, which returns as soon as the array is submitted)."""
    from msscale.certify.merge import merge_run
    from msscale.cluster import resolve_cluster

    cluster = resolve_cluster(cluster)
    if shards < 1 or sample_splits < 1:
        raise UserError("--shards and --sample-splits must be at least 1")
    if parallelism is not None and parallelism < 1:  # no task would ever start: a hang
        raise UserError(f"--array-parallelism must be at least 1, got {parallelism}")
    if not wait and cluster != "slurm":
        raise UserError(f"--no-wait needs --cluster slurm: {cluster} shards run only while "
                        "this command waits")
    with run_lock(cfg["out"], "certify_array"):  # one command writes a run directory
        run = submit_array(cfg, cluster, shards, sample_splits, parallelism)
        if not wait:
            log.info("not waiting: run the same command again to wait for the shards and merge")
            return None
        try:
            wait_for(run, poll_s)
        except KeyboardInterrupt:
            if cluster == "slurm":
                log.warning("stopped waiting; the Slurm jobs go on: run the same command again "
                            "to wait for them and merge")
            raise
        counts = merge_run(cfg["out"])
    log.info("merged %d images: %s", len(counts.index), Path(cfg["out"]) / "report.md")
    return counts


# ---------------------------------------------------------------------------- command line


def array_parser() -> argparse.ArgumentParser:
    """tools/certify_array.py's arguments."""
    parser = argparse.ArgumentParser(prog="tools/certify_array.py",
                                     description=run_array.__doc__.splitlines()[0])
    parser.add_argument("--cfg", help="certify YAML config (default: the embedded digits one)")
    parser.add_argument("--shards", type=int, required=True,
                        help="image groups (the array has shards x sample-splits tasks)")
    parser.add_argument("--sample-splits", type=int, default=1,
                        help="also split each image group's estimation draws M ways")
    parser.add_argument("--cluster", default="auto", choices=CLUSTERS,
                        help="auto (default): Slurm when a controller answers, else local "
                        "processes; debug: one after another in this process")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("--array-parallelism", type=int, help="most tasks running at once")
    parser.add_argument("--no-wait", action="store_true",
                        help="(slurm) submit and return at once; run again to wait and merge")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. smoothing.n=1000 slurm.partition=gpu")
    return parser


def run_array_command(args: argparse.Namespace):
    """The parsed command: the config (or the embedded default), then `run_array`."""
    from msscale.certify.schema import load_certify_config

    cfg_path, overrides = args.cfg, list(args.overrides)
    if cfg_path is None:
        from msscale.demo.embedded import certify_default

        cfg_path, defaults = certify_default()
        log.info("no --cfg: the embedded default, %s", cfg_path)
        overrides = [*defaults, *overrides]
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_certify_config(cfg_path, overrides)
    return run_array(cfg, args.cluster, args.shards, args.sample_splits,
                     args.array_parallelism, wait=not args.no_wait)
