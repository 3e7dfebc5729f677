"""The calibration training loop: DDP and DeepSpeed over two real gloo processes, resume
after SIGKILL, NaN handling, and bad input. Tiny UNet, 16x16 digits, a few steps each."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from msscale.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Runs under torchrun: the loop as `python -m msscale.finetune.job` runs it, plus a dump of
# each rank's final parameters (wrapping msscale.finetune.loop.finish, which every rank calls).
RANK_DUMP_SCRIPT = """
import json, os, sys
from pathlib import Path
from safetensors.torch import save_file
import msscale.finetune.loop as train
from msscale.finetune.job import main

if os.environ.get("MSSCALE_TEST_NO_SHM_OP"):
    # DeepSpeed's optional CPU shared-memory allreduce is JIT-compiled on first use
    # (minutes on 2 cores); without it gloo carries every collective. The attribute
    # `deepspeed.comm.torch` is the torch package itself: patch the module.
    import deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

original_finish = train.finish

def finish(accelerator, run, out):
    rank = accelerator.process_index
    state = {k: v.detach().float().cpu().contiguous()
             for k, v in accelerator.unwrap_model(run.unet).state_dict().items()}
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    plugin = accelerator.state.deepspeed_plugin
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
    }))
    return original_finish(accelerator, run, out)

train.finish = finish
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """Tiny random denoiser + classifier, digits train and test shards (16x16)."""
    from msscale.data.shards import make_shards
    from msscale.models.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("finetune-assets")
    sections = make_tiny_models(root / "models", image_size=16)
    make_shards("digits", root / "train", split="train", image_size=16, shard_size=300)
    make_shards("digits", root / "test", split="test", image_size=16, shard_size=100)
    sections["train_shards"] = str(root / "train" / "dataset.json")
    sections["val_shards"] = str(root / "test" / "dataset.json")
    return sections


def write_cfg(assets: dict, tmp_path: Path, name: str = "run", **sections) -> Path:
    """A finetune YAML over the assets that trains a few steps in seconds on a CPU."""
    cfg = {
        "seed": 1,
        "out": str(tmp_path / name),
        "denoiser": assets["denoiser"],
        "classifier": assets["classifier"],
        "data": {"train_shards": assets["train_shards"], "val_shards": None, "image_size": 16,
                 "num_workers": 0, "shuffle_buffer": 50, "epoch_length": 100, "flip": False},
        "calibration": {"sigmas": [0.25, 0.5, 1.0], "draws": 2},
        "train": {"max_steps": 4, "checkpoint_every": 2, "batch_size": 8, "lr": 1e-3,
                  "log_every": 1, "eval_every": 100, "warmup_steps": 1},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide state; in-process runs start and end without it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun_two(tmp_path: Path, cfg: Path, **env) -> Path:
    script = tmp_path / "rank_dump.py"
    script.write_text(RANK_DUMP_SCRIPT)
    out = Path(yaml.safe_load(cfg.read_text())["out"])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), str(script), "--cfg", str(cfg)],
        cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _assert_replicas_trained_and_equal(out: Path, initial: dict) -> list[dict]:
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
    changed = [k for k in initial if not torch.equal(initial[k].float(), ranks[0][k])]
    assert len(changed) > len(initial) // 2, "training did not move the UNet"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _initial_unet(assets) -> dict:
    return load_file(Path(assets["denoiser"]["path"]) / "diffusion_pytorch_model.safetensors")


def test_ddp_two_gloo_processes_keep_identical_parameters(assets, tmp_path):
    cfg = write_cfg(assets, tmp_path, "ddp", train={"grad_accum": 2, "max_steps": 3,
                                                    "checkpoint_every": 3})
    out = _torchrun_two(tmp_path, cfg)
    infos = _assert_replicas_trained_and_equal(out, _initial_unet(assets))
    assert all(i["num_processes"] == 2 and i["distributed_type"].endswith("MULTI_CPU")
               for i in infos)
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3


def test_deepspeed_zero2_two_gloo_processes_keep_identical_parameters(assets, tmp_path):
    cfg = write_cfg(assets, tmp_path, "zero2", train={"max_steps": 3, "checkpoint_every": 3},
                    deepspeed={"config": str(REPO / "configs" / "deepspeed" / "zero2.json")})
    out = _torchrun_two(tmp_path, cfg, MSSCALE_TEST_NO_SHM_OP="1")
    infos = _assert_replicas_trained_and_equal(out, _initial_unet(assets))
    assert all(i["num_processes"] == 2 and i["distributed_type"].endswith("DEEPSPEED")
               and i["zero_stage"] == 2 for i in infos)
    # Every rank took part in saving: DeepSpeed's per-rank optimizer shards are there.
    shards = list((out / "checkpoints" / "step-00000003").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards


def _tb_tags(tb_dir: Path) -> tuple[set, set, dict]:
    """Scalar and image tags, and each histogram tag's image count at its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images, histograms = set(), set(), {}
    for events in tb_dir.glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0,
                                                           "histograms": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
        for tag in acc.Tags()["histograms"]:
            histograms[tag] = acc.Histograms(tag)[-1].histogram_value.num
    return scalars, images, histograms


def test_killed_run_resumes_from_latest_and_finishes(assets, tmp_path):
    from msscale.models.loading import load_denoiser

    cfg = write_cfg(assets, tmp_path, "resume",
                    data={"val_shards": assets["val_shards"], "val_images": 8},
                    train={"max_steps": 10, "checkpoint_every": 3, "eval_every": 10,
                           "checkpoints_total_limit": 2})
    out = tmp_path / "resume"
    latest = out / "checkpoints" / "latest"
    command = [sys.executable, "-m", "msscale.finetune.job", "--cfg", str(cfg)]
    first = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    saved = latest.read_text().strip()
    saved_step = int(saved.split("-")[1])
    assert 3 <= saved_step < 10, f"the first run got to {saved} before the kill"
    saved_unet = load_file(out / "checkpoints" / saved / "unet" /
                           "diffusion_pytorch_model.safetensors")

    second = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-5000:]
    assert f"resumed from {out / 'checkpoints' / saved} at step {saved_step}" in second.stderr
    # The parameters it resumed with are the ones saved (digest: sum, sum of squares).
    total = sum(float(v.double().sum()) for v in saved_unet.values())
    squares = sum(float((v.double() ** 2).sum()) for v in saved_unet.values())
    assert f"(parameter digest {total:.10e}/{squares:.10e})" in second.stderr
    initial = _initial_unet(assets)
    assert sum(float(v.double().sum()) for v in initial.values()) != pytest.approx(total)

    assert latest.read_text().strip() == "step-00000010"
    final_state = json.loads((out / "checkpoints" / "step-00000010" / TRAINER_STATE).read_text())
    assert final_state == {"step": 10, "nan_skipped": 0}
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000009", "step-00000010"]  # rotated to checkpoints_total_limit
    assert not list((out / "checkpoints").glob(".tmp-*"))
    denoiser = load_denoiser(out / "final")  # what a certify config's denoiser.path loads
    assert denoiser.unet.config.sample_size == 16

    scalars, images, histograms = _tb_tags(out / "tb")
    for tag in ("loss/total", "loss/brier", "loss/anti_consistency", "loss/diffusion",
                "recoverable/sigma_0.25", "recoverable/sigma_1", "train/lr", "train/grad_norm",
                "perf/images_per_s_per_device", "eval/sigma_0.5/denoise_classify_acc",
                "eval/sigma_0.5/smoothed_acc", "eval/sigma_0.5/defer_fraction",
                "eval/sigma_1/confidently_wrong"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "eval/sigma_0.25/noisy_denoised_clean" in images
    # pA of every validation image, right or wrong, at each scale
    for sigma in ("0.25", "0.5", "1"):
        shares = [histograms.get(f"eval/sigma_{sigma}/top_share_{kind}", 0)
                  for kind in ("right", "wrong")]
        assert sum(shares) == 8, (sigma, histograms)  # data.val_images


TRAINER_STATE = "trainer_state.json"


def test_nan_losses_are_skipped_counted_and_stop_the_run(assets, tmp_path, monkeypatch,
                                                         fresh_accelerate):
    import msscale.finetune.losses
    from msscale.finetune.loop import train
    from msscale.finetune.schema import load_finetune_config

    real_loss = msscale.finetune.losses.calibration_loss
    calls = []

    def sometimes_nan(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls.append(len(calls) + 1)
        if len(calls) == 2 or len(calls) >= 5:  # one NaN early, then NaN for good
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(msscale.finetune.losses, "calibration_loss", sometimes_nan)
    cfg = load_finetune_config(write_cfg(assets, tmp_path, "nan", train={
        "max_steps": 6, "checkpoint_every": 2, "max_nan_steps": 2}))
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    ckpt = tmp_path / "nan" / "checkpoints" / "step-00000002"
    # calls 1, 3, 4 trained (steps 1-3), calls 2, 5, 6 were skipped: 3 > max_nan_steps=2
    assert "stopped at step 3: 3 steps had a non-finite loss" in message
    assert str(ckpt) in message
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert json.loads((ckpt / TRAINER_STATE).read_text()) == {"step": 2, "nan_skipped": 1}
    weights = load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "nan" / "final").exists()


def _run_expecting(cfg_path: Path, capsys) -> str:
    from msscale.finetune.job import main

    assert main(["--cfg", str(cfg_path)]) == 2
    return capsys.readouterr().err


def test_shard_url_that_matches_nothing(assets, tmp_path, capsys, fresh_accelerate):
    url = str(tmp_path / "nowhere" / "shard-{000000..000003}.tar")
    err = _run_expecting(write_cfg(assets, tmp_path, data={"train_shards": url}), capsys)
    assert "msscale finetune: error:" in err and "no shard file matches" in err and url in err


def test_corrupt_sample(assets, tmp_path, capsys, fresh_accelerate):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in range(16):
            for ext, payload in (("png", b"not a png at all"), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, __import__("io").BytesIO(payload))
    err = _run_expecting(write_cfg(assets, tmp_path, data={"train_shards": str(shard)}), capsys)
    assert re.search(r"cannot decode \d{6}\.png", err) and str(shard) in err


@pytest.mark.parametrize("key, value, expected", [
    ("gradient_accumulation_steps", 4, "train.grad_accum"),
    ("gradient_clipping", 0.5, "train.max_grad_norm"),
    ("train_micro_batch_size_per_gpu", 16, "train.batch_size"),
])
def test_deepspeed_json_that_contradicts_the_yaml(assets, tmp_path, capsys, key, value,
                                                  expected, fresh_accelerate):
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    ds[key] = value
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_cfg(assets, tmp_path, train={"grad_accum": 2},
                    deepspeed={"config": str(tmp_path / "ds.json")})
    err = _run_expecting(cfg, capsys)
    assert f"DeepSpeed config sets {key}={value!r}" in err and expected in err


def test_deepspeed_json_fills_auto_from_the_yaml():
    from msscale.finetune.accelerator import resolve_deepspeed_config

    ds = resolve_deepspeed_config(REPO / "configs" / "deepspeed" / "zero3.json", micro_batch=4,
                                  grad_accum=2, world_size=8, max_grad_norm=1.0,
                                  mixed_precision="bf16")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"], ds["gradient_clipping"]) == (4, 2, 64, 1.0)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
