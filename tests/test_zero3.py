"""ZeRO-3 that really partitions: two real gloo processes under torchrun, a UNet whose
parameters DeepSpeed cuts into per-rank slices (the test's DeepSpeed JSON lowers the
persistence threshold and makes every module gather and release its parameters, as at full
size), kill -9 of one rank after a checkpoint, resume, export, and resume on one process.

The exported EMA is checked against an independent reconstruction: DeepSpeed's own
zero_to_fp32 on every step's checkpoint, fed to diffusers' EMAModel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 1000  # stage3_param_persistence_threshold: tensors with more elements are cut
STEPS = 6
EMA_DECAY = 0.9

# Runs under torchrun: the loop as `python -m msscale.finetune.job` runs it, plus this rank's
# pid at start and, at the end (msscale.finetune.loop.finish, which every rank calls), what
# this rank holds of each parameter.
RANK_SCRIPT = """
import json, os, sys
from pathlib import Path

# DeepSpeed JIT-compiles an optional CPU shared-memory all-reduce on first use (minutes on
# 2 cores); without it gloo carries every collective. (`deepspeed.comm.torch` as an
# attribute is the torch package: patch the module itself.)
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

import msscale.finetune.loop as loop
from msscale.finetune.job import main

out = Path(os.environ["TEST_OUT"])
out.mkdir(parents=True, exist_ok=True)
(out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
original_finish = loop.finish

def finish(accelerator, run, out):
    module = accelerator.unwrap_model(run.unet)
    params = {name: {"ds_numel": p.ds_numel, "local": p.ds_tensor.numel(), "data": p.numel(),
                     "persist": bool(p.ds_persist)} for name, p in module.named_parameters()}
    (Path(out) / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "params": params, "world": accelerator.num_processes,
        "gradient_checkpointing": module.is_gradient_checkpointing}))
    return original_finish(accelerator, run, out)

loop.finish = finish
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A tiny random denoiser (164k parameters, 34 tensors above THRESHOLD elements), a
    classifier, digits train and test shards (16x16), and the test's DeepSpeed JSON."""
    from msscale.data.shards import make_shards
    from msscale.models.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("zero3-assets")
    sections = make_tiny_models(root / "models", image_size=16)
    make_shards("digits", root / "train", split="train", image_size=16, shard_size=300)
    make_shards("digits", root / "test", split="test", image_size=16, shard_size=100)
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"].update(
        stage3_param_persistence_threshold=THRESHOLD,
        stage3_max_live_parameters=THRESHOLD,  # gather a module's slices, release them after
        stage3_max_reuse_distance=0,
        stage3_prefetch_bucket_size=THRESHOLD,
    )
    (root / "zero3.json").write_text(json.dumps(ds))
    return {**sections, "train_shards": str(root / "train" / "dataset.json"),
            "val_shards": str(root / "test" / "dataset.json"),
            "deepspeed": str(root / "zero3.json")}


def write_cfg(assets: dict, tmp_path: Path) -> Path:
    cfg = {
        "seed": 3,
        "out": str(tmp_path / "run"),
        "denoiser": assets["denoiser"],
        "classifier": assets["classifier"],
        "data": {"train_shards": assets["train_shards"], "val_shards": assets["val_shards"],
                 "val_images": 9,  # 5 on rank 0, 4 on rank 1: the ranks' batches differ
                 "image_size": 16, "num_workers": 0, "shuffle_buffer": 50, "epoch_length": 100,
                 "flip": False},
        "calibration": {"sigmas": [0.25, 0.5, 1.0], "draws": 2},
        "train": {"max_steps": STEPS, "checkpoint_every": 1, "checkpoints_total_limit": 20,
                  "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "ema_decay": EMA_DECAY,
                  "log_every": 1, "eval_every": 100, "gradient_checkpointing": True},
        "deepspeed": {"config": assets["deepspeed"]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(script: Path, cfg: Path, procs: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", str(_free_port()), str(script), "--cfg", str(cfg), *overrides]


def _env(out: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TEST_OUT": str(out)}


@pytest.fixture(scope="module")
def killed_and_resumed(assets, tmp_path_factory) -> dict:
    """Two processes: run, kill -9 rank 1 once a checkpoint exists, run the same command
    again to the end. Returns the run directory, the step resumed from and the logs."""
    tmp = tmp_path_factory.mktemp("zero3")
    cfg = write_cfg(assets, tmp)
    script = tmp / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out = tmp / "run"
    latest = out / "checkpoints" / "latest"
    log = tmp / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen(_command(script, cfg, 2), cwd=REPO, env=_env(out),
                                 stdout=subprocess.DEVNULL, stderr=sink)
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() >= "step-00000002":
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed:\n" + \
            log.read_text()[-4000:]
        os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
        first.wait(timeout=120)
    assert first.returncode != 0, "torchrun should fail when a rank is killed"
    saved = latest.read_text().strip()
    second = subprocess.run(_command(script, cfg, 2), cwd=REPO, env=_env(out),
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-6000:]
    return {"out": out, "cfg": cfg, "script": script, "saved": saved,
            "second_err": second.stderr}


def _fp32_weights(checkpoint: Path) -> dict:
    """The whole fp32 weights of a ZeRO checkpoint, by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")


def _digest(weights: dict) -> str:
    values = [v.detach().double() for v in weights.values()]
    total = sum(float(v.sum()) for v in values)
    squares = sum(float((v**2).sum()) for v in values)
    return f"{total:.10e}/{squares:.10e}"


def test_each_rank_holds_only_its_partition(killed_and_resumed):
    out = killed_and_resumed["out"]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["gradient_checkpointing"] for r in ranks)
    params = ranks[0]["params"]
    cut = [name for name, p in params.items() if p["ds_numel"] > THRESHOLD]
    assert len(cut) >= 30, "the test UNet is too small for ZeRO-3 to partition it"
    for rank in ranks:
        for name, p in rank["params"].items():
            if name in cut:  # a slice of half the elements (padded), the whole tensor freed
                assert not p["persist"], name
                assert p["local"] == math.ceil(p["ds_numel"] / 2), (name, p)
                assert p["data"] == 0, (name, p)
            else:  # kept whole on every rank
                assert p["persist"] and p["data"] == p["ds_numel"], (name, p)
    held = sum(p["local"] for p in params.values() if not p["persist"])
    whole = sum(p["ds_numel"] for p in params.values() if not p["persist"])
    assert held < 0.51 * whole
    assert re.search(r"ZeRO-3 partitions on this rank: \{'parameters': \d+, 'local_elements'",
                     killed_and_resumed["second_err"])


def test_killed_rank_run_resumes_at_its_checkpoint(killed_and_resumed):
    out, saved = killed_and_resumed["out"], killed_and_resumed["saved"]
    step = int(saved.split("-")[1])
    assert 2 <= step < STEPS, f"killed after {saved}"
    err = killed_and_resumed["second_err"]
    digest = _digest(_fp32_weights(out / "checkpoints" / saved))
    # The weights it resumed with are the checkpoint's, gathered from both ranks' slices.
    assert f"resumed from {out / 'checkpoints' / saved} at step {step} " \
           f"(parameter digest {digest})" in err, err[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    # The evaluation at the end ran on both ranks although their image counts differ.
    assert "eval at step 6" in err


def test_final_is_the_gathered_ema_of_the_checkpointed_weights(killed_and_resumed):
    """final/ equals diffusers' EMAModel fed, step by step, the weights that DeepSpeed's
    zero_to_fp32 reconstructs from every step's two-rank checkpoint (across the kill)."""
    from diffusers.training_utils import EMAModel

    out = killed_and_resumed["out"]
    initial = load_file(Path(yaml.safe_load(killed_and_resumed["cfg"].read_text())
                             ["denoiser"]["path"]) / "diffusion_pytorch_model.safetensors")
    names = list(initial)
    reference = EMAModel([torch.nn.Parameter(initial[n].float()) for n in names],
                         decay=EMA_DECAY)
    for step in range(1, STEPS + 1):
        weights = _fp32_weights(out / "checkpoints" / f"step-{step:08d}")
        reference.step([torch.nn.Parameter(weights[n]) for n in names])
    final = load_file(out / "final" / "diffusion_pytorch_model.safetensors")
    assert final.keys() == set(names)
    for name, expected in zip(names, reference.shadow_params, strict=True):
        assert torch.equal(final[name], expected), name
    last = out / "checkpoints" / f"step-{STEPS:08d}" / "unet_ema"
    saved = load_file(last / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[n], final[n]) for n in names)
    assert json.loads((last / "config.json").read_text())["optimization_step"] == STEPS
    assert not torch.equal(final[names[0]], weights[names[0]])  # an average, not the weights


def test_two_process_checkpoint_resumes_on_one(killed_and_resumed, tmp_path):
    """A Slurm requeue on fewer nodes: the two-rank checkpoint loads in one process through
    DeepSpeed's universal checkpoint, with the same weights and EMA, and training goes on."""
    source = killed_and_resumed["out"]
    out = tmp_path / "one"
    shutil.copytree(source, out, symlinks=True)
    for leftover in out.glob("rank*.json"):
        leftover.unlink()
    done = subprocess.run(
        _command(killed_and_resumed["script"], killed_and_resumed["cfg"], 1, f"out={out}",
                 f"train.max_steps={STEPS + 2}"),
        cwd=REPO, env=_env(out), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-6000:]
    last = out / "checkpoints" / f"step-{STEPS:08d}"
    assert "written by 2 processes, this run has 1: loading it as a universal checkpoint" \
        in done.stderr
    digest = _digest(_fp32_weights(source / "checkpoints" / f"step-{STEPS:08d}"))
    assert f"resumed from {last} at step {STEPS} (parameter digest {digest})" in done.stderr
    assert (last / "universal" / "pytorch_model" / "zero").is_dir()
    rank = json.loads((out / "rank0.json").read_text())
    assert rank["world"] == 1
    new = out / "checkpoints" / f"step-{STEPS + 2:08d}" / "pytorch_model"
    assert len(list(new.glob("*optim_states.pt"))) == 1
    ema = json.loads((out / "checkpoints" / f"step-{STEPS + 2:08d}" / "unet_ema" /
                      "config.json").read_text())
    assert ema["optimization_step"] == STEPS + 2  # the EMA's counters came back too
