"""Distributed certification (issue 3): shard arrays on every executor, re-runs after a kill,
and the exact merge of per-scale votes.

Every run certifies the same config (12 digits, 3 scales, n0 10, n 40 in noise blocks of 16,
so 3 estimation blocks; progress flushed after every image) and must give counts identical,
array for array, to one plain `msscale certify` of it (the `reference` fixture), and the same
certify.tsv. A shard costs a process start (seconds of imports) on this 2-core machine, so
not every split runs on every executor. The split arithmetic is the same code whatever runs
the tasks, so it is checked in this process, on the debug executor (the same ShardTask,
array bookkeeping and merge as the others): 7 shards (image groups of 2 and 1), 1x3 sample
splits (selection draws only in split 0) and 3x2 (both at once). The other executors then
show that their tasks give the same counts, each with a split of its own:

- local: 2 shards, one task SIGKILLed mid-way, then the same command again;
- Slurm through submitit: 1x2 with --no-wait, one task scancelled mid-way, then the same
  command again (one image group, so the cancelled task still has most images to do);
- Slurm through sbatch: 2 shards (one per node), then merge.sbatch with
  --dependency=afterok.

The 1-shard split is the reference itself. The Slurm kill uses smoothing.batch_size=1: the
counts do not depend on the batch size (counter-based noise, which this also checks), but
each image then takes long enough for the kill to land before the task ends: a plain
scancel gives a submitit task SIGTERM (which submitit ignores) and SIGKILL only KillWait
(2 s) later, so the cancelled task must have more than that left to do.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import write_certify_yaml

from msscale.certify.counts import load_counts, save_counts
from msscale.certify.plan import progress_path, shard_path
from msscale.certify.schema import load_certify_config
from msscale.certify.shard import run_shard
from msscale.cli import main as msscale_main

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "certify_array.py"
MSSCALE = Path(sys.executable).parent / "msscale"
IMAGES = 12
RESULTS = ("counts.npz", "certify.tsv", "summary.json", "report.md", "certified_accuracy.png")


def _load_tool():
    spec = importlib.util.spec_from_file_location("certify_array_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Shards run in this process use one thread, as an array task with 1 CPU does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg_path(assets, tmp_path_factory) -> Path:
    """The certify config of every run here (each run names its own --out)."""
    root = tmp_path_factory.mktemp("certify_array")
    path = write_certify_yaml(assets, root / "certify.yaml", root / "unused", flush_every=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["max_images"] = IMAGES
    cfg["slurm"] = {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(cfg_path, tmp_path_factory) -> Path:
    """The run directory of one plain `msscale certify` of the config."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert msscale_main(["certify", "--cfg", str(cfg_path), f"out={out}"]) == 0
    return out


def assert_same_as_reference(run: Path, reference: Path) -> None:
    """counts.npz equal array for array, and the same certificates."""
    got, want = load_counts(run / "counts.npz"), load_counts(reference / "counts.npz")
    assert got.index.tolist() == list(range(IMAGES))
    for key in ("index", "label", "sigmas", "select", "estimate"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)
    assert (run / "certify.tsv").read_text() == (reference / "certify.tsv").read_text()
    for name in RESULTS:
        assert (run / name).stat().st_size > 0, name


def run_tool(cfg_path: Path, out: Path, *args: str) -> int:
    """tools/certify_array.py's main in this process (the log goes to caplog)."""
    return tool.main(["--cfg", str(cfg_path), "--out", str(out), *args])


def tool_command(cfg_path: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(TOOL), "--cfg", str(cfg_path), "--out", str(out), *args]


def submitted_pickles(out: Path) -> list[Path]:
    return sorted((out / "logs").glob("*_submitted.pkl"))


def recorded_jobs(out: Path) -> dict[int, str]:
    """{shard: job id} from the run directory's logs/jobs.json."""
    jobs = json.loads((out / "logs" / "jobs.json").read_text())["jobs"]
    return {int(shard): job_id for shard, job_id in jobs.items()}


def wait_for_path(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended ({proc.returncode}) before {path} appeared:\n"
                        f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def assert_resumed(out: Path, shard: int, total: int, done_before: int) -> None:
    """The re-submitted job of `shard` resumed from the progress file the kill left."""
    job_id = recorded_jobs(out)[shard]
    log_text = (out / "logs" / f"{job_id}_0_log.err").read_text()
    name = progress_path(out, shard, total).name
    assert f"resuming {name}: {done_before} images already done" in log_text, log_text


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run directory's config and shard files (no results, no logs)."""
    dest.mkdir(parents=True)
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "counts", dest / "counts")
    return dest


# ------------------------------------------------------------------ debug executor (in-process)


@pytest.fixture(scope="module")
def seven_shards(cfg_path, tmp_path_factory, reference) -> Path:
    out = tmp_path_factory.mktemp("seven") / "run"
    assert run_tool(cfg_path, out, "--shards", "7", "--cluster", "debug") == 0
    return out


@pytest.fixture(scope="module")
def three_splits(cfg_path, tmp_path_factory, reference) -> Path:
    out = tmp_path_factory.mktemp("splits") / "run"
    assert run_tool(cfg_path, out, "--shards", "1", "--sample-splits", "3", "--cluster",
                    "debug") == 0
    return out


def test_seven_shards_equal_plain_certify(seven_shards, reference):
    assert len(list((seven_shards / "counts").glob("shard-*-of-00007.npz"))) == 7
    assert_same_as_reference(seven_shards, reference)


def test_sample_splits_equal_plain_certify(three_splits, reference):
    metas = [load_counts(shard_path(three_splits, t, 3)).meta for t in range(3)]
    assert [m["estimate_blocks"] for m in metas] == [[0, 1], [1, 2], [2, 3]]
    assert [m["select_blocks"] for m in metas] == [[0, 1], [0, 0], [0, 0]]
    assert_same_as_reference(three_splits, reference)


def test_image_groups_times_sample_splits_equal_plain_certify(cfg_path, reference, tmp_path):
    out = tmp_path / "run"
    assert run_tool(cfg_path, out, "--shards", "3", "--sample-splits", "2", "--cluster",
                    "debug") == 0
    metas = [load_counts(shard_path(out, t, 6)).meta for t in range(6)]
    assert [m["estimate_blocks"] for m in metas] == [[0, 2], [2, 3]] * 3
    assert [len(load_counts(shard_path(out, t, 6)).index) for t in range(6)] == [4] * 6
    assert_same_as_reference(out, reference)


# --------------------------------------------------- the sequential schedule over shards

# Looks at 16, 32 and 40 draws (blocks of 16); with these settings the tiny models defer
# some scales at the first look, and some images go on to a smaller scale.
SEQUENTIAL = ("smoothing.schedule=sequential", "smoothing.first_look=16",
              "smoothing.radius_tolerance=0.5", "smoothing.p0=0.9", "smoothing.alpha=0.1")


@pytest.fixture(scope="module")
def sequential_reference(cfg_path, tmp_path_factory) -> Path:
    """One plain `msscale certify` of the config under the sequential schedule."""
    out = tmp_path_factory.mktemp("sequential-reference") / "run"
    assert msscale_main(["certify", "--cfg", str(cfg_path), f"out={out}", *SEQUENTIAL]) == 0
    used = load_counts(out / "counts.npz").used
    assert 16 in used and (used[:, 1] > 0).any(), "not vacuous: early stops and deferrals"
    return out


def assert_same_sequential_run(run: Path, reference: Path) -> None:
    assert_same_as_reference(run, reference)
    got, want = load_counts(run / "counts.npz"), load_counts(reference / "counts.npz")
    np.testing.assert_array_equal(got.used, want.used)
    assert got.meta["looks"] == want.meta["looks"] == [16, 32, 40]
    assert (run / "summary.json").read_text() == (reference / "summary.json").read_text()


def test_sequential_shards_equal_plain_certify(cfg_path, sequential_reference, tmp_path):
    out = tmp_path / "run"
    assert run_tool(cfg_path, out, "--shards", "5", "--cluster", "debug", *SEQUENTIAL) == 0
    assert_same_sequential_run(out, sequential_reference)


def test_sequential_shards_on_the_local_executor(cfg_path, sequential_reference, tmp_path):
    out = tmp_path / "run"
    assert run_tool(cfg_path, out, "--shards", "2", "--cluster", "local", *SEQUENTIAL) == 0
    assert_same_sequential_run(out, sequential_reference)


def test_sequential_refuses_sample_splits(cfg_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tool(cfg_path, out, "--shards", "2", "--sample-splits", "2", "--cluster",
                    "debug", *SEQUENTIAL) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample splits need smoothing.schedule=full" in err, err
    assert not (out / "counts").exists()


# ------------------------------------------------------------------------ merge refuses


def _missing(run: Path, tmp: Path, cfg_path: Path) -> str:
    shard_path(run, 3, 7).unlink()
    return "shard-00003-of-00007.npz is missing"


def _duplicated(run: Path, tmp: Path, cfg_path: Path) -> str:
    shutil.copy(shard_path(run, 1, 7), shard_path(run, 2, 7))
    return "shard-00002-of-00007.npz holds shard 1 of 7, not shard 2 of 7"


def _redo_shard_2(run: Path, cfg_path: Path, *overrides: str) -> None:
    shard_path(run, 2, 7).unlink()
    run_shard(load_certify_config(cfg_path, [f"out={run}", *overrides]), 2, 7)


def _other_seed(run: Path, tmp: Path, cfg_path: Path) -> str:
    _redo_shard_2(run, cfg_path, "seed=8")
    return "shard-00002-of-00007.npz is not from the same run as shard-00000-of-00007.npz: seed 8"


def _other_model(run: Path, tmp: Path, cfg_path: Path) -> str:
    from msscale.models.tiny import make_tiny_models

    models = make_tiny_models(tmp / "other-models", image_size=16, seed=1)
    _redo_shard_2(run, cfg_path, f"denoiser.path={models['denoiser']['path']}")
    return "shard-00002-of-00007.npz is not from the same run as shard-00000-of-00007.npz: model"


def _truncated(run: Path, tmp: Path, cfg_path: Path) -> str:
    path = shard_path(run, 2, 7)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "shard-00002-of-00007.npz is truncated"


@pytest.mark.parametrize(
    "damage", [_missing, _duplicated, _other_seed, _other_model, _truncated],
    ids=["missing", "duplicated", "other-seed", "other-model", "truncated"],
)
def test_merge_refuses(damage, seven_shards, cfg_path, tmp_path, capsys):
    """`msscale merge` exits non-zero with one line naming the file and the problem, and
    writes nothing."""
    run = copy_run(seven_shards, tmp_path / "run")
    expected = damage(run, tmp_path, cfg_path)
    capsys.readouterr()
    assert msscale_main(["merge", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not [name for name in RESULTS if (run / name).exists()]


def test_merge_refuses_overlapping_sample_blocks(three_splits, tmp_path, capsys):
    run = copy_run(three_splits, tmp_path / "run")
    shard = load_counts(shard_path(run, 2, 3))
    shard.meta["estimate_blocks"] = [1, 3]  # also claims block 1, which shard 1 holds
    save_counts(shard, shard_path(run, 2, 3))
    assert msscale_main(["merge", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlapping estimate blocks" in err, err
    assert "shard-00001-of-00003.npz" in err and "shard-00002-of-00003.npz" in err, err
    assert not [name for name in RESULTS if (run / name).exists()]


def test_merge_exit_status_of_the_real_command(seven_shards, tmp_path):
    run = copy_run(seven_shards, tmp_path / "run")
    shard_path(run, 6, 7).unlink()
    proc = subprocess.run([str(MSSCALE), "merge", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("msscale merge: error: ") and proc.stderr.count("\n") == 1
    assert "shard-00006-of-00007.npz is missing" in proc.stderr
    assert not [name for name in RESULTS if (run / name).exists()]


# ------------------------------------------------------------- tools/certify_array.py answers


def test_rerun_on_a_complete_run_dir_submits_nothing_and_merges(
    seven_shards, cfg_path, reference, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    run = copy_run(seven_shards, tmp_path / "run")
    assert run_tool(cfg_path, run, "--shards", "7", "--cluster", "local") == 0
    assert "7 already done, 0 still queued from an earlier submission, 0 to submit" in caplog.text
    assert not submitted_pickles(run)
    assert_same_as_reference(run, reference)


def test_run_dir_of_another_config_is_refused(seven_shards, cfg_path, tmp_path, capsys):
    run = copy_run(seven_shards, tmp_path / "run")
    assert run_tool(cfg_path, run, "--shards", "7", "--cluster", "local", "smoothing.n=60") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run made with another config" in err, err
    assert "smoothing.n is 40 there and 60 here" in err, err
    assert run_tool(cfg_path, run, "--shards", "3", "--cluster", "local") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shards of a run split another way" in err, err
    assert not submitted_pickles(run)
    assert not (run / "counts.npz").exists()


def test_no_wait_needs_slurm(cfg_path, tmp_path, capsys):
    assert run_tool(cfg_path, tmp_path / "run", "--shards", "2", "--cluster", "local",
                    "--no-wait") == 2
    assert "--no-wait needs --cluster slurm" in capsys.readouterr().err


def test_failing_shard_is_one_error_line_naming_its_log(cfg_path, tmp_path, capsys):
    """A problem only a task finds (its classifier has 10 classes, not 7)."""
    code = run_tool(cfg_path, tmp_path / "run", "--shards", "1", "--cluster", "local",
                    "classifier.num_classes=7")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("certify_array: error: 1 of 1 shards failed"), err
    assert "has 10 classes but classifier.num_classes is 7" in err, err
    log_file = Path(err.split("(log: ")[1].split(")")[0])
    assert log_file.is_file() and "has 10 classes" in log_file.read_text()
    assert not (tmp_path / "run" / "counts.npz").exists()


def test_what_every_task_would_fail_on_is_refused_before_submitting(cfg_path, tmp_path,
                                                                   capsys):
    missing = tmp_path / "nowhere"
    code = run_tool(cfg_path, tmp_path / "run", "--shards", "2", "--cluster", "local",
                    f"denoiser.path={missing}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"denoiser.path {missing} is not a directory" in err, err
    assert not (tmp_path / "run").exists()  # no task, no log, no config


# ------------------------------------------------------------------ local executor, SIGKILL


def test_local_sigkill_mid_way_then_same_command_again(cfg_path, reference, tmp_path, caplog):
    """2 shards of 6 images; the task of shard 0 is SIGKILLed after its first image. The
    command reports it in one error line and ends non-zero; run again, it submits only
    shard 0, which resumes from its progress file."""
    out = tmp_path / "run"
    args = ("--shards", "2", "--cluster", "local")
    proc = subprocess.Popen(tool_command(cfg_path, out, *args), stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_path(progress_path(out, 0, 2), timeout=240, proc=proc)
        controller = int(recorded_jobs(out)[0])
        children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert children and not shard_path(out, 0, 2).exists()
    done_before = len(load_counts(progress_path(out, 0, 2)).index)
    assert 1 <= done_before < IMAGES // 2
    assert proc.returncode == 2
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and "1 of 2 shards failed (shards 0); first: shard 0" in error[0], err
    assert "before writing its shard file (log: " in error[0]
    assert shard_path(out, 1, 2).exists()

    caplog.set_level(logging.INFO)
    assert run_tool(cfg_path, out, *args) == 0
    assert "submitting shards 0 to local" in caplog.text
    assert_resumed(out, 0, 2, done_before)
    assert_same_as_reference(out, reference)


# ----------------------------------------------------------------------------- real Slurm


def test_slurm_no_wait_scancel_mid_way_then_same_command_again(
    slurm_cluster, cfg_path, reference, tmp_path, caplog
):
    """--no-wait returns once the array is submitted; shard 0 (all 12 images, split 0) is
    scancelled after its first image; the same command without --no-wait then submits
    only shard 0 (shard 1 is done, or waited for if still queued), which resumes."""
    out = tmp_path / "run"
    args = ("--shards", "1", "--sample-splits", "2", "--cluster", "slurm",
            "smoothing.batch_size=1")
    started = time.monotonic()
    proc = subprocess.run(tool_command(cfg_path, out, *args, "--no-wait"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not list((out / "counts").glob("shard-*.npz")), "returned only after shards ran"
    assert "submitting shards 0-1 to slurm" in proc.stderr
    jobs = recorded_jobs(out)
    assert set(jobs) == {0, 1}
    queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    assert set(jobs.values()) <= set(queued.stdout.split())

    wait_for_path(progress_path(out, 0, 2), timeout=240)
    subprocess.run(["scancel", jobs[0]], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while slurm_cluster.job_state(jobs[0]) != "CANCELLED":
        assert time.monotonic() < deadline, slurm_cluster.job_state(jobs[0])
        time.sleep(0.2)
    assert not shard_path(out, 0, 2).exists(), "the task ended before scancel killed it"
    done_before = len(load_counts(progress_path(out, 0, 2)).index)
    assert 1 <= done_before < IMAGES

    caplog.set_level(logging.INFO)
    assert run_tool(cfg_path, out, *args) == 0
    assert "submitting shards 0 to slurm" in caplog.text
    assert_resumed(out, 0, 2, done_before)
    assert_same_as_reference(out, reference)
    assert time.monotonic() - started < 600


def test_sbatch_array_then_merge_after_afterok(slurm_cluster, cfg_path, reference, tmp_path):
    """slurm/certify_array.sbatch (2 shards) and slurm/merge.sbatch after it: the same
    counts and certificates as the submitit path (which equals the reference)."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    env = {**os.environ, "MSSCALE": str(MSSCALE)}

    def sbatch(*args: str) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                              env=env, timeout=30, check=True)
        return proc.stdout.strip().split(";")[0]

    array = sbatch("--array=0-1", f"--output={out}/logs/%A_%a.out",
                   str(ROOT / "slurm" / "certify_array.sbatch"), str(cfg_path), "2", "1",
                   f"out={out}")
    merge = sbatch(f"--dependency=afterok:{array}", f"--output={out}/logs/merge-%j.out",
                   str(ROOT / "slurm" / "merge.sbatch"), str(out))
    deadline = time.monotonic() + 400
    while (state := slurm_cluster.job_state(merge)) not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, f"merge job still {state}"
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.out")))
    assert state == "COMPLETED", logs
    assert sorted(p.name for p in (out / "counts").glob("*.npz")) == [
        f"shard-{t:05d}-of-00002.npz" for t in range(2)
    ]
    assert_same_as_reference(out, reference)
