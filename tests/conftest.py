"""Shared pytest fixtures for msscale's tests."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest
import submitit

# ---------------------------------------------------------------------------------------
# Slurm cluster fixture (owner: tests/slurm_cluster.py).  A real Slurm cluster of two
# one-CPU nodes, started once per session; tests that use it get the `slurm` marker.
# ---------------------------------------------------------------------------------------
from slurm_cluster import SlurmCluster, start_cluster

log = logging.getLogger(__name__)


def _in_ci() -> bool:
    """Whether we run in CI (env CI set to anything but '', 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running local Slurm cluster (partition "debug", nodes node1 and node2).

    SLURM_CONF is exported while it runs, and a ``sacct`` stand-in (answering from
    scontrol) is first on PATH so submitit sees job states.  For speed, submitit polls
    the state every second (instead of backing off to minutes) and waits 2 s (not 15 s)
    for the result file of a job that ended without one.  If the cluster cannot start,
    tests fail in CI (CI set) and are skipped elsewhere, with the reason either way.
    """
    started = time.monotonic()
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    except Exception as exc:  # RuntimeError mostly; OSError, KeyError (no munge user)...
        reason = f"cannot start the local Slurm cluster: {exc}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    log.info("slurm_cluster fixture ready in %.1f s", time.monotonic() - started)
    job_cls = submitit.SlurmJob
    old = {"watcher": job_cls.watcher, "_results_timeout_s": job_cls._results_timeout_s}
    job_cls.watcher = submitit.slurm.slurm.SlurmInfoWatcher(delay_s=1)
    job_cls._results_timeout_s = 2
    try:
        yield cluster
    finally:
        for name, value in old.items():
            setattr(job_cls, name, value)
        cluster.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the slurm_cluster fixture with `slurm`; deselect `fullsize`
    tests unless MSSCALE_FULL_SIZE=1 and `long_stats` tests unless MSSCALE_LONG_STATS=1
    (pytest then reports them as deselected)."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
    for marker, env in (("fullsize", "MSSCALE_FULL_SIZE"), ("long_stats", "MSSCALE_LONG_STATS")):
        if os.environ.get(env, "") == "1":
            continue
        deselected = [item for item in items if item.get_closest_marker(marker)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


# ----------------------------- end of Slurm cluster block ------------------------------


# ---------------------------------------------------------------------------------------
# Certification assets (owner: tests/helpers.py): tiny random models and digit shards,
# built once per session.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from helpers import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"))
