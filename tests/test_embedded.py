"""The embedded default: the tools without --cfg, and `--cluster auto`.

A new user's first command is `python tools/certify_array.py --shards 4` on a machine with
no Slurm and no data: it must pick the local executor, make the digits' shards and certify.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msscale.certify.schema import load_certify_config
from msscale.cluster import resolve_cluster, slurm_answers
from msscale.demo.embedded import CONFIGS, model_overrides
from msscale.finetune.schema import load_finetune_config

ROOT = Path(__file__).resolve().parents[1]
PATH_KEYS = {("denoiser", "path"), ("classifier", "checkpoint"), ("data", "shards"),
             ("data", "train_shards"), ("data", "val_shards")}


def _without_paths(cfg: dict) -> dict:
    return {section: ({k: v for k, v in values.items() if (section, k) not in PATH_KEYS}
                      if isinstance(values, dict) else values)
            for section, values in cfg.items()}


@pytest.mark.parametrize("name, load", [("certify_digits.yaml", load_certify_config),
                                        ("finetune_digits.yaml", load_finetune_config)])
def test_repository_configs_are_the_embedded_ones(name: str, load, monkeypatch) -> None:
    """configs/*_digits.yaml (paths relative to a checkout) say what the packaged ones say."""
    monkeypatch.chdir(ROOT)
    data = ["data.shards=x"] if "certify" in name else ["data.train_shards=x",
                                                        "data.val_shards=x"]
    embedded = load(CONFIGS / name, [*model_overrides(), *data])
    repository = load(ROOT / "configs" / name, [])
    assert _without_paths(embedded) == _without_paths(repository)
    assert Path(embedded["denoiser"]["path"]).resolve() == \
        Path(repository["denoiser"]["path"]).resolve()


def _env_without_slurm(tmp_path: Path) -> dict:
    """An empty PATH (no sbatch, no scontrol): this machine as a laptop without Slurm."""
    (tmp_path / "bin").mkdir()
    return {**os.environ, "PATH": str(tmp_path / "bin")}


def test_certify_array_without_cfg_or_slurm(tmp_path: Path) -> None:
    """No --cfg, no Slurm, no data: local executor, digits made on first use, merged."""
    env = _env_without_slurm(tmp_path)
    command = [sys.executable, str(ROOT / "tools" / "certify_array.py"), "--shards", "2",
               "out=run", "data.max_images=4", "smoothing.n0=8", "smoothing.n=24"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--cluster auto: no Slurm controller answers" in result.stderr
    assert "first use: writing the digits' test split" in result.stderr
    assert (tmp_path / "data" / "digits-test" / "dataset.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images"] == 4
    assert len((tmp_path / "run" / "certify.tsv").read_text().splitlines()) == 5
    assert sorted(p.name for p in (tmp_path / "run" / "counts").glob("shard-*.npz")) == [
        "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]


def test_auto_is_local_without_slurm(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not slurm_answers()
    assert resolve_cluster("auto") == "local"
    assert resolve_cluster("debug") == "debug"


def test_auto_is_slurm_when_a_controller_answers(slurm_cluster) -> None:
    assert slurm_answers()
    assert resolve_cluster("auto") == "slurm"
