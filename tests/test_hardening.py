"""Issue 14: no result from broken inputs, verified data, one run per directory, no tracebacks.

Each test gives a command one broken input the way a user would and checks what it does:
one line on stderr naming the problem, exit status 2, nothing half-written and no result;
or, where the input is legitimate but unusual (16-bit images, mixed sizes), the right result.
Commands run in this process (`msscale.cli.main`), so a traceback fails the test outright.
Sampling runs are tiny (2 images, n0 4, n 8, 2 scales) and few.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import write_certify_yaml
from PIL import Image

from msscale.certify.array import array_parser, run_array_command
from msscale.certify.counts import Counts, load_counts, save_counts
from msscale.certify.plan import shard_path
from msscale.cli import main
from msscale.data import dataset as reading
from msscale.data import shards as writing
from msscale.errors import UserError, run_command
from msscale.paths import LOCK_NAME, run_lock
from msscale.smoothing.sampling import NonFiniteLogits, count_votes, plan_blocks

SMALL = {"sigmas": [0.5, 1.0], "n0": 4, "n": 8, "noise_block": 8, "batch_size": 32}
RESULTS = ("counts.npz", "certify.tsv", "summary.json", "report.md")


# ------------------------------------------------------------------------------ helpers


def small_yaml(assets: dict, root: Path, out: Path | None = None, **data) -> Path:
    """A certify config over the test assets: 2 images, 2 scales, 12 draws per scale."""
    root.mkdir(parents=True, exist_ok=True)
    path = write_certify_yaml(assets, root / "certify.yaml", out or root / "run", **SMALL)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update({"max_images": 2, **data})
    path.write_text(yaml.safe_dump(cfg))
    return path


def fails(capsys, argv: list[str], *expected: str) -> str:
    """`msscale argv` ends with exit 2 and one stderr line holding every `expected`."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("msscale "), err
    for text in expected:
        assert text in err, err
    return err


def array(capsys, cfg: Path, out: Path, *args: str) -> tuple[int, str]:
    """tools/certify_array.py in this process: (exit status, stderr)."""
    capsys.readouterr()
    parsed = array_parser().parse_args(["--cfg", str(cfg), "--out", str(out), *args])
    code = run_command("certify_array", lambda: run_array_command(parsed))
    return code, capsys.readouterr().err


def no_results(run: Path) -> None:
    assert not [name for name in RESULTS if (run / name).exists()]
    assert not list(run.glob("counts/shard-*.npz"))


def copy_data(assets: dict, dest: Path) -> Path:
    shutil.copytree(Path(assets["data"]["shards"]).parent, dest)
    return dest / "dataset.json"


def edit_label(shard: Path) -> None:
    """Change the first sample's label inside the tar (its size and headers stay the same)."""
    content = bytearray(shard.read_bytes())
    at = content.index(b"000000.cls") + 512  # the member's data block follows its header
    content[at] = ord("9") if content[at] != ord("9") else ord("8")
    shard.write_bytes(bytes(content))


def call_with_timeout(function, seconds: float = 60):
    """function() in a thread; fails the test if it has not returned after `seconds` (a
    read of a FIFO would block forever)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function()),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the command hung"
    return result["value"]


# ------------------------------------------------------- 1. non-finite outputs never vote


class HalfNaN(torch.nn.Module):
    """Logits that are NaN for every draw of an image whose pixels are near 100, and for
    the draws of the other images whose first noisy pixel is positive; it counts them."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes, self.bad = num_classes, {}

    def forward(self, noisy, timesteps):
        logits = torch.zeros(len(noisy), self.num_classes)
        logits[:, 1] = 1.0
        far = noisy.mean(dim=(1, 2, 3)) > 50
        bad = far | (noisy[:, 0, 0, 0] > 0)
        logits[bad] = float("nan")
        for image, t in zip(far[bad].tolist(), timesteps[bad].tolist(), strict=True):
            key = (9 if image else 5, t)
            self.bad[key] = self.bad.get(key, 0) + 1
        return logits


def test_count_votes_counts_non_finite_draws_apart():
    images = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 100.0)])
    streams, draws = {0: range(1), 1: range(2)}, {0: 5, 1: 14}
    blocks = plan_blocks([(0, 5), (1, 9)], [0, 1], streams, draws, noise_block=8)
    model = HalfNaN(num_classes=3)
    with pytest.raises(NonFiniteLogits) as caught:
        count_votes(model, images, blocks, [0.5, 1.0], [10, 20], 3, seed=1, batch_size=7)
    err = caught.value
    assert err.count == sum(model.bad.values()) and err.total == 2 * 2 * (5 + 14)
    assert model.bad[(9, 10)] == model.bad[(9, 20)] == 5 + 14  # every draw of image 9
    first_scale = 0 if model.bad.get((5, 10)) else 1
    assert (err.image, err.sigma) == (5, [0.5, 1.0][first_scale])
    assert "non-finite logits" in str(err) and f"for {err.count} of 76 draws" in str(err)


def test_count_votes_counts_finite_draws_and_refuses_inf():
    images = torch.zeros(1, 3, 4, 4)
    blocks = plan_blocks([(0, 3)], [0], {1: range(1)}, {1: 6}, noise_block=6)

    def model(noisy, timesteps):
        logits = torch.zeros(len(noisy), 4)
        logits[:, 2] = 1
        return logits

    votes = count_votes(model, images, blocks, [0.5], [10], 4, seed=0, batch_size=4)
    assert votes.shape == (1, 1, 3, 4) and votes[0, 0, 1].tolist() == [0, 0, 6, 0]

    def infinite(noisy, timesteps):
        logits = model(noisy, timesteps)
        logits[0, 3] = float("inf")  # one draw per batch: a sure argmax, but not finite
        return logits

    with pytest.raises(NonFiniteLogits, match="for 2 of 6 draws, first at image 3"):
        count_votes(infinite, images, blocks, [0.5], [10], 4, seed=0, batch_size=4)


@pytest.fixture(scope="module")
def nan_classifier(assets, tmp_path_factory) -> dict:
    """The test classifier with a NaN in its head: what a diverged fine-tune leaves."""
    from safetensors.torch import load_file, save_file

    state = load_file(assets["classifier"]["checkpoint"])
    head = next(name for name in state if name.endswith("weight") and state[name].ndim == 2)
    state[head][3, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "classifier.safetensors"
    save_file(state, str(path))
    return {**assets, "classifier": {**assets["classifier"], "checkpoint": str(path)}}


def test_certify_refuses_a_model_that_outputs_nan(nan_classifier, tmp_path, capsys):
    cfg = small_yaml(nan_classifier, tmp_path)
    fails(capsys, ["certify", "--cfg", cfg], "non-finite logits", "first at image 0", "sigma 0.5")
    no_results(tmp_path / "run")
    assert not list((tmp_path / "run").glob("counts/*.npz"))  # no progress either
    fails(capsys, ["predict", "--cfg", cfg, "--n", "4"], "non-finite logits")
    assert not (tmp_path / "run" / "predict.tsv").exists()


def test_export_refuses_a_unet_with_non_finite_weights_or_output(tmp_path):
    from diffusers import DDPMScheduler

    from msscale.finetune.checkpoints import export_final
    from msscale.models.tiny import tiny_unet

    torch.manual_seed(0)
    unet, scheduler = tiny_unet(8, channels=(8, 16)), DDPMScheduler(num_train_timesteps=50)
    broken = copy.deepcopy(unet)
    with torch.no_grad():
        list(broken.parameters())[3].view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="non-finite values"):
        export_final(broken, scheduler, tmp_path)
    assert not (tmp_path / "final").exists()

    overflowing = copy.deepcopy(unet)
    with torch.no_grad():
        for param in overflowing.parameters():
            param.mul_(1e30)  # finite weights whose output overflows
    with pytest.raises(UserError, match="output on a test input is not finite"):
        export_final(overflowing, scheduler, tmp_path)
    assert not (tmp_path / "final").exists()

    final = export_final(unet, scheduler, tmp_path)
    assert (final / "config.json").is_file() and (final / "scheduler").is_dir()


# ------------------------------------------------------------------- 2. data integrity


def test_edited_shard_is_refused_before_any_draw(assets, tmp_path, capsys):
    data = copy_data(assets, tmp_path / "data")
    edit_label(data.parent / "digits-000000.tar")
    cfg = small_yaml({**assets, "data": {"shards": str(data)}}, tmp_path)
    fails(capsys, ["certify", "--cfg", cfg], "digits-000000.tar does not match", "sha256")
    assert not (tmp_path / "run").exists()
    fails(capsys, ["predict", "--cfg", cfg], "digits-000000.tar does not match")
    fails(capsys, ["verify-data", data.parent], "digits-000000.tar does not match")


def test_array_verifies_the_data_before_submitting(assets, tmp_path, capsys):
    data = copy_data(assets, tmp_path / "data")
    cfg = small_yaml({**assets, "data": {"shards": str(data)}}, tmp_path)
    edit_label(data.parent / "digits-000000.tar")
    code, err = array(capsys, cfg, tmp_path / "run", "--shards", "2", "--cluster", "debug")
    assert code == 2 and err.count("\n") == 1 and "does not match" in err, err
    assert not list((tmp_path / "run").glob("logs/*.pkl")) and not (tmp_path / "run").exists()


def test_each_shard_task_verifies_the_shards_it_reads(assets, tmp_path):
    """The data may change while an array waits in the queue: a task checks its own
    shards (and only those: the images of shard 1 of 2 here lie in the first data shard)."""
    from msscale.certify.schema import load_certify_config
    from msscale.certify.shard import run_shard

    data = copy_data(assets, tmp_path / "data")
    cfg = load_certify_config(small_yaml({**assets, "data": {"shards": str(data)}}, tmp_path))
    edit_label(data.parent / "digits-000000.tar")
    with pytest.raises(UserError, match="digits-000000.tar does not match"):
        run_shard(cfg, 1, 2)
    dataset = reading.open_dataset(data)
    assert dataset.shards_holding([1]) == [0] and dataset.shards_holding([99, 100]) == [0, 1]
    dataset.verify([100, 359])  # the edited shard is not read for these
    assert sorted(dataset.verified) == [1, 3]


def test_fingerprint_comes_from_the_verified_files(assets):
    dataset = reading.open_dataset(assets["data"]["shards"])
    dataset.verify()
    digest = hashlib.sha256()
    for shard in dataset.shards:
        digest.update(hashlib.sha256(shard.read_bytes()).hexdigest().encode() + b"\n")
    assert dataset.fingerprint() == digest.hexdigest()


@pytest.mark.parametrize("sha256, message", [
    ("0" * 63, "64 lower-case hex digits"),
    ("g" * 64, "64 lower-case hex digits"),
    (12345, "64 lower-case hex digits"),
    ("0" * 64, "does not match"),  # well-formed, but not the file's
])
def test_bad_recorded_checksums(assets, tmp_path, sha256, message):
    data = copy_data(assets, tmp_path / "data")
    meta = json.loads(data.read_text())
    meta["shards"][1]["sha256"] = sha256
    data.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        reading.open_dataset(data).verify()


@pytest.mark.parametrize("edit, message", [
    ({"count": 0, "shards[0].count": 0}, "shards[0].count must be a positive integer"),
    ({"count": "360"}, "'count' is '360'"),
    ({"shards[0].count": 100.0}, "shards[0].count must be a positive integer"),
    ({"num_classes": 1}, "'num_classes' must be an integer >= 2"),
    ({"shards[0].name": "../x.tar"}, "is not a file name"),
])
def test_bad_dataset_json_is_refused_when_read(assets, tmp_path, edit, message):
    data = copy_data(assets, tmp_path / "data")
    meta = json.loads(data.read_text())
    for key, value in edit.items():
        if key.startswith("shards[0]."):
            meta["shards"][0][key.split(".", 1)[1]] = value
        else:
            meta[key] = value
    data.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        reading.open_dataset(data)


def test_verify_data_command(assets, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    data = copy_data(assets, tmp_path / "data")
    assert main(["verify-data", str(data.parent)]) == 0
    assert "all 4 shards match" in caplog.text
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(data.parent / "digits-000001.tar", bare)
    fails(capsys, ["verify-data", bare / "digits-000001.tar"], "no dataset.json")


# -------------------------------------------------------------- 3. one run per directory


@pytest.fixture(scope="module")
def two_shards(assets, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a finished 2-shard debug array of 4 images."""
    root = tmp_path_factory.mktemp("two")
    cfg = small_yaml(assets, root, max_images=4)
    parsed = array_parser().parse_args(["--cfg", str(cfg), "--out", str(root / "run"),
                                        "--shards", "2", "--cluster", "debug"])
    assert run_command("certify_array", lambda: run_array_command(parsed)) == 0
    return cfg, root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*RESULTS, "tb", "logs"))
    return dest


def test_a_held_run_directory_refuses_other_writers(two_shards, tmp_path, capsys):
    cfg, finished = two_shards
    run = copy_run(finished, tmp_path / "run")
    holder = subprocess.Popen(  # another process, as another command would be
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(run / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(capsys, ["certify", "--cfg", cfg, f"out={run}"], f"{run} is in use")
        fails(capsys, ["merge", run], "is in use")
        code, err = array(capsys, cfg, run, "--shards", "2", "--cluster", "debug")
        assert code == 2 and "is in use" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "counts.npz").exists()
    assert main(["merge", str(run)]) == 0  # free again


def test_lock_is_exclusive_in_one_process_too(tmp_path):
    with run_lock(tmp_path / "run", "first") as out:
        with pytest.raises(UserError, match=r"in use by another command \(first \(pid"):
            with run_lock(out, "second"):
                pass
        with open(out / LOCK_NAME) as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not (tmp_path / "run").exists()  # created, and left holding nothing: removed


def test_config_is_recorded_only_once_the_run_starts(assets, tmp_path, capsys):
    cfg = small_yaml(assets, tmp_path, max_images=1)
    fails(capsys, ["certify", "--cfg", cfg, f"denoiser.path={tmp_path}/typo"],
          "is not a directory")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    fails(capsys, ["certify", "--cfg", cfg, "classifier.num_classes=7"], "has 10 classes")
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / LOCK_NAME]
    assert main(["certify", "--cfg", str(cfg)]) == 0  # the corrected command is not refused
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["classifier"]["num_classes"] == 10


def test_a_config_whose_run_computed_nothing_is_replaced(two_shards, tmp_path, capsys):
    cfg, finished = two_shards
    run = copy_run(finished, tmp_path / "run")
    fails(capsys, ["certify", "--cfg", cfg, f"out={run}", "smoothing.n=9"],
          "holds a run made with another config", "smoothing.n is 8 there and 9 here")
    shutil.rmtree(run / "counts")
    (run / "config.yaml").write_bytes(b"\x00\xff binary")  # also unreadable: no work, replaced
    assert main(["certify", "--cfg", str(cfg), f"out={run}", "smoothing.n=9",
                 "data.max_images=1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["smoothing"]["n"] == 9


def _rewrite_shard(run: Path, shard: int, keep) -> None:
    counts = load_counts(shard_path(run, shard, 2))
    rows = keep(np.arange(len(counts.index)))
    save_counts(Counts(counts.index[rows], counts.label[rows], counts.sigmas,
                       counts.select[rows], counts.estimate[rows], counts.meta),
                shard_path(run, shard, 2))


@pytest.mark.parametrize("keep, message", [
    (lambda rows: rows[:-1], "lacks 1 of the 2 images planned for it (first: image 3)"),
    (lambda rows: rows[[0, 0, 1]], "holds some images twice"),
])
def test_merge_refuses_a_shard_without_its_planned_images(two_shards, tmp_path, capsys,
                                                          keep, message):
    run = copy_run(two_shards[1], tmp_path / "run")
    _rewrite_shard(run, 1, keep)
    fails(capsys, ["merge", run], "shard-00001-of-00002.npz", message)
    assert not (run / "counts.npz").exists()


def test_merge_refuses_a_shard_holding_another_shards_image(two_shards, tmp_path, capsys):
    run = copy_run(two_shards[1], tmp_path / "run")
    counts = load_counts(shard_path(run, 1, 2))
    counts.index = counts.index + 1  # images 3 and 4 instead of 2 and 3
    save_counts(counts, shard_path(run, 1, 2))
    fails(capsys, ["merge", run], "lacks 1 of the 2 images planned for it (first: image 2)")


def test_merge_refuses_shards_without_the_metadata_it_needs(two_shards, tmp_path, capsys):
    run = copy_run(two_shards[1], tmp_path / "run")
    counts = load_counts(shard_path(run, 0, 2))
    del counts.meta["images"]
    save_counts(counts, shard_path(run, 0, 2))
    fails(capsys, ["merge", run], "shard-00000-of-00002.npz: its metadata lacks ['images']")


@pytest.mark.parametrize("key, value, message", [
    ("images", "4", "metadata images is '4', expected an integer >= 0"),
    ("noise_block", 0, "metadata noise_block is 0, expected an integer >= 1"),
    ("sample_splits", 3, "do not divide into sample_splits 3"),
    ("estimate_blocks", [0], "metadata estimate_blocks is [0], expected [start, stop]"),
])
def test_merge_refuses_shard_metadata_of_the_wrong_kind(two_shards, tmp_path, capsys, key,
                                                        value, message):
    run = copy_run(two_shards[1], tmp_path / "run")
    counts = load_counts(shard_path(run, 0, 2))
    counts.meta[key] = value
    save_counts(counts, shard_path(run, 0, 2))
    fails(capsys, ["merge", run], "shard-00000-of-00002.npz", message)


def test_a_directory_where_the_merge_writes_is_one_line(two_shards, tmp_path, capsys):
    run = copy_run(two_shards[1], tmp_path / "run")
    (run / "counts.npz").mkdir()
    fails(capsys, ["merge", run], "Is a directory")
    assert not list(run.glob(".counts.npz.*"))


# ------------------------------------------------------------ 4. inputs checked at the door


@pytest.mark.parametrize("override, message", [
    ("smoothing.alpha=.nan", "smoothing.alpha: expected a finite number, got nan"),
    ("smoothing.alpha=0.5", "smoothing.alpha: expected < 0.5"),
    ("smoothing.p0=.inf", "smoothing.p0: expected a finite number"),
    ("smoothing.p0=.nan", "smoothing.p0: expected a finite number"),
    ("smoothing.sigmas=[0.5,.nan]", "smoothing.sigmas[1]: expected a finite number"),
    ("smoothing.sigmas=[0.5,.inf]", "smoothing.sigmas[1]: expected a finite number"),
    ("classifier.mean=[0.5,.nan,0.5]", "classifier.mean[1]: expected a finite number"),
    ("classifier.std=[0.5,0,0.5]", "classifier.std: expected positive values"),
    ("classifier.std=[0.5,0.5]", "classifier.std: expected 3 values"),
    ("classifier.mean=[0.5,0.5,0.5,0.5]", "classifier.mean: expected 3 values"),
    ("out=", "config key out must not be empty"),
    ("out=' '", "config key out must not be empty"),
    ("denoiser.path=", "config key denoiser.path must not be empty"),
    ("data.shards=", "config key data.shards must not be empty"),
    ("classifier.checkpoint=", "config key classifier.checkpoint must not be empty"),
])
def test_config_values_are_checked_before_any_work(assets, tmp_path, capsys, override, message):
    cfg = small_yaml(assets, tmp_path)
    fails(capsys, ["certify", "--cfg", cfg, override], message)
    assert not (tmp_path / "run").exists()


def test_finetune_config_refuses_non_finite_values():
    from msscale.finetune.schema import load_finetune_config

    root = Path(__file__).resolve().parents[1]
    for override in ("train.lr=.nan", "calibration.lambda_ac=.inf",
                     "calibration.sigma_weights=[1,.nan,1]", "out="):
        with pytest.raises(UserError, match="finite number|must not be empty"):
            load_finetune_config(root / "configs" / "finetune_digits.yaml", [override])


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not text"),
    (b"smoothing: [unclosed\n  n: 3\n", "is not valid YAML"),
    (b"{1: 2, out: x}", "unknown config key 1"),
])
def test_unreadable_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    fails(capsys, ["certify", "--cfg", path], message)


def test_fifos_are_refused_not_waited_on(assets, tmp_path, capsys):
    fifo = tmp_path / "dataset.json"
    os.mkfifo(fifo)
    cfg = small_yaml({**assets, "data": {"shards": str(fifo)}}, tmp_path)
    run = call_with_timeout(lambda: fails(capsys, ["certify", "--cfg", cfg],
                                          "dataset file", "is not a regular file"))
    assert "dataset.json" in run
    os.mkfifo(tmp_path / "c.yaml.fifo")
    call_with_timeout(lambda: fails(capsys, ["certify", "--cfg", tmp_path / "c.yaml.fifo"],
                                    "is not a regular file"))
    os.mkfifo(tmp_path / "counts.npz")
    call_with_timeout(lambda: fails(capsys, ["recertify", tmp_path / "counts.npz", "--out",
                                             tmp_path / "x.tsv"], "is not a regular file"))
    os.mkfifo(tmp_path / "w.safetensors")
    cfg = small_yaml(assets, tmp_path / "c2")
    call_with_timeout(lambda: fails(
        capsys, ["certify", "--cfg", cfg, f"classifier.checkpoint={tmp_path}/w.safetensors"],
        "classifier.checkpoint", "is not a regular file"))


def test_outputs_are_checked_before_work(assets, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    cfg = small_yaml(assets, tmp_path, out=taken)
    fails(capsys, ["certify", "--cfg", cfg], f"out {taken} exists and is not a directory")
    fails(capsys, ["predict", "--cfg", cfg], "exists and is not a directory")
    code, err = array(capsys, cfg, taken, "--shards", "1", "--cluster", "debug")
    assert code == 2 and "exists and is not a directory" in err, err
    fails(capsys, ["make-shards", "--source", "digits", "--out", taken],
          "exists and is not a directory")
    assert taken.read_text() == "a file"
    fails(capsys, ["certify", "--cfg", cfg, f"out={taken}/sub"], f"{taken} is not a directory")


def test_no_output_overwrites_an_input(two_shards, tmp_path, capsys):
    counts = tmp_path / "counts.npz"
    shutil.copy(two_shards[1] / "counts.npz", counts)
    before = counts.read_bytes()
    fails(capsys, ["recertify", counts, "--out", counts], "is the input")
    fails(capsys, ["recertify", counts, "--out", tmp_path / "." / ".." / tmp_path.name /
                   "counts.npz"], "is the input")
    (tmp_path / "link.tsv").symlink_to(counts)
    fails(capsys, ["recertify", counts, "--out", tmp_path / "link.tsv"], "is the input")
    fails(capsys, ["recertify", counts, "--out", tmp_path], "is a directory")
    fails(capsys, ["recertify", counts, "--out", ""], "--out is empty")
    report_in = tmp_path / "summary.json"
    shutil.copy(counts, report_in)
    fails(capsys, ["report", report_in, "--out", tmp_path], "is the input")
    fails(capsys, ["report", counts, "--out", tmp_path / "link.tsv"], "is not a directory")
    assert counts.read_bytes() == before and report_in.read_bytes() == before


def test_make_shards_refuses_out_inside_its_source(tmp_path, capsys):
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "pets" / "cat" / "a.png")
    fails(capsys, ["make-shards", "--source", tmp_path / "pets", "--out",
                   tmp_path / "pets" / "cat"], "is inside the source")
    assert sorted(p.name for p in (tmp_path / "pets" / "cat").iterdir()) == ["a.png"]


@pytest.mark.parametrize("n", ["-5", "0"])
def test_predict_needs_a_positive_number_of_draws(assets, tmp_path, capsys, n):
    cfg = small_yaml(assets, tmp_path)
    fails(capsys, ["predict", "--cfg", cfg, "--n", n],
          f"--n must be a positive number of draws, got {n}")
    assert not (tmp_path / "run").exists()


def test_certify_shard_needs_a_positive_split(assets, tmp_path, capsys):
    cfg = small_yaml(assets, tmp_path)
    fails(capsys, ["certify-shard", "--cfg", cfg, "--shard", "0", "--shards", "0"],
          "--shards and --sample-splits must be at least 1")
    code, err = array(capsys, cfg, tmp_path / "run", "--shards", "1", "--cluster", "local",
                      "--array-parallelism", "0")  # no task would start: it waited forever
    assert code == 2 and "--array-parallelism must be at least 1" in err, err
    fails(capsys, ["make-shards", "--source", "digits", "--out", tmp_path / "d",
                   "--image-size", "0"], "image_size must be positive or None, got 0")


# images: every PIL mode converted faithfully


def _png16_rgb(path: Path, values: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): `values` [H, W, 3] uint16."""
    height, width, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _mode_folder(root: Path) -> dict[str, np.ndarray]:
    """One class folder per image mode; returns the RGB pixels each must come out as."""
    grey16 = np.array([[0, 257, 32896], [65535, 1000, 65280]], np.uint16)
    expected_grey = np.round(grey16 * (255 / 65535)).astype(np.uint8)
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 255, 0, 128]]], np.uint8)
    alpha = rgba[..., 3:] / 255
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    rgb16 = np.array([[[65535, 0, 32768], [256, 511, 65280]]], np.uint16)
    cases = {
        "i16": (Image.fromarray(grey16), np.repeat(expected_grey[..., None], 3, axis=2)),
        "i32": (Image.fromarray(grey16.astype(np.int32)),
                np.repeat(expected_grey[..., None], 3, axis=2)),
        "rgba": (Image.fromarray(rgba, "RGBA"),
                 np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)),
        "la": (Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), "LA"),
               np.array([[[255] * 3, [40] * 3]], np.uint8)),
        "palette": (palette, np.array([[[10, 20, 30], [255, 255, 255]]], np.uint8)),
        "cmyk": (Image.new("CMYK", (2, 1), (0, 255, 255, 0)),
                 np.array([[[255, 0, 0]] * 2], np.uint8)),
        "bilevel": (Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1"),
                    np.array([[[0] * 3, [255] * 3]], np.uint8)),
    }
    expected = {}
    for name, (image, pixels) in cases.items():
        (root / name).mkdir(parents=True)
        # TIFF keeps CMYK and 32-bit integers as they are (PNG would make I 16-bit)
        image.save(root / name / ("a.tiff" if name in ("cmyk", "i32") else "a.png"))
        expected[name] = pixels
    (root / "rgb16").mkdir()
    _png16_rgb(root / "rgb16" / "a.png", rgb16)
    expected["rgb16"] = (rgb16 >> 8).astype(np.uint8)  # PIL keeps the high bytes
    return expected


def test_image_modes_are_converted_faithfully(tmp_path):
    expected = _mode_folder(tmp_path / "modes")
    info = writing.make_shards(tmp_path / "modes", tmp_path / "out", image_size=None)
    names = info["class_names"]
    for _, image, label in reading.open_dataset(tmp_path / "out").iter_images(
            range(info["count"])):
        got = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.int64)
        want = expected[names[label]].astype(np.int64)
        assert np.abs(got - want).max() <= 1, (names[label], got.tolist(), want.tolist())


def test_unreadable_modes_are_named_or_skipped(tmp_path):
    root = tmp_path / "modes"
    (root / "ok").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(root / "ok" / "a.png")
    (root / "float").mkdir()
    Image.fromarray(np.ones((2, 2), np.float32)).save(root / "float" / "a.tiff")
    (root / "wide").mkdir()
    Image.fromarray(np.full((2, 2), 70000, np.int32)).save(root / "wide" / "a.tiff")
    with pytest.raises(UserError, match=r"float/a\.tiff.*mode F"):
        writing.make_shards(root, tmp_path / "out", image_size=None)
    info = writing.make_shards(root, tmp_path / "out", image_size=None, skip_bad=True)
    assert sorted(info["skipped"]) == ["float/a.tiff", "wide/a.tiff"] and info["count"] == 1


def test_16_bit_pngs_in_foreign_shards_are_scaled(tmp_path):
    import webdataset as wds

    grey16 = np.array([[0, 65535], [32896, 257]], np.uint16)
    with wds.TarWriter(str(tmp_path / "x-000000.tar")) as writer:
        buffer = tmp_path / "g.png"
        Image.fromarray(grey16).save(buffer)
        writer.write({"__key__": "000000", "png": buffer.read_bytes(), "cls": 1})
    (_, image, _), = reading.open_dataset(str(tmp_path / "x-000000.tar")).iter_images([0])
    assert torch.equal(torch.round(image[0] * 255), torch.tensor([[0.0, 255.0], [128.0, 1.0]]))


# ---------------------------------------------------- counts files and the results of none


def _counts_file(path: Path, **change) -> Path:
    fields = dict(index=np.arange(2), label=np.array([1, 2]), sigmas=np.array([0.5, 1.0]),
                  select=np.full((2, 2, 3), 2), estimate=np.full((2, 2, 3), 5),
                  meta=json.dumps({"alpha": 0.01, "p0": 0.5}))
    fields.update(change)
    with open(path, "wb") as handle:
        np.savez(handle, **fields)
    return path


@pytest.mark.parametrize("change, message", [
    ({"meta": "{not json"}, "meta is not JSON"),
    ({"meta": "[1, 2]"}, "meta is not a JSON object"),
    ({"select": np.full((2, 2, 3), 2.5)}, "select holds float64 values, expected integers"),
    ({"estimate": np.full((2, 2, 3), 5.0)}, "estimate holds float64 values"),
    ({"estimate": np.full((2, 2, 3), -5)}, "estimate holds negative values"),
    ({"sigmas": np.array([0.5, np.nan])}, "sigmas must be finite, positive and ascending"),
    ({"sigmas": np.array([1.0, 0.5])}, "sigmas must be finite, positive and ascending"),
    ({"index": np.array(["a", "b"])}, "index holds <U1 values"),
])
def test_counts_files_with_bad_contents(tmp_path, capsys, change, message):
    path = _counts_file(tmp_path / "counts.npz", **change)
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv"], message)
    fails(capsys, ["report", path, "--out", tmp_path / "r"], message)
    assert not (tmp_path / "c.tsv").exists() and not (tmp_path / "r" / "summary.json").exists()


def test_counts_without_levels_need_them_given(tmp_path, capsys):
    path = _counts_file(tmp_path / "counts.npz", meta="{}")
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv"], "no alpha: pass --alpha")
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv", "--alpha", "0.01"],
          "no p0: pass --p0")
    assert main(["recertify", str(path), "--out", str(tmp_path / "c.tsv"), "--alpha", "0.01",
                 "--p0", "0.5"]) == 0
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv", "--alpha", "nan",
                   "--p0", "0.5"], "alpha must be in (0, 0.5)")
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv", "--alpha", "0.01",
                   "--p0", "0.5", "--sigmas", ","], "no scales given")


def test_counts_of_no_images_certify_nothing(tmp_path, capsys):
    path = _counts_file(tmp_path / "counts.npz", index=np.zeros(0, np.int64),
                        label=np.zeros(0, np.int64), select=np.zeros((0, 2, 3), np.int64),
                        estimate=np.zeros((0, 2, 3), np.int64))
    fails(capsys, ["report", path, "--out", tmp_path / "r"], "hold no images")
    fails(capsys, ["recertify", path, "--out", tmp_path / "c.tsv"], "hold no images")
    assert not (tmp_path / "r" / "summary.json").exists()


# --------------------------------------------------- 5. failures a user causes: one line


def test_disk_full_is_one_line_and_leaves_nothing_half_written(two_shards, tmp_path, capsys,
                                                                monkeypatch):
    counts = two_shards[1] / "counts.npz"
    written = []
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        written.append(self)
        real(self, text[: len(text) // 2])  # part of it reaches the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    fails(capsys, ["recertify", counts, "--out", tmp_path / "c.tsv"],
          "No space left on device: ", ".c.tsv.")
    assert written and not list(tmp_path.iterdir())  # no c.tsv, no temporary file


def test_unwritable_out_is_refused_before_work(assets, tmp_path, capsys, monkeypatch):
    cfg = small_yaml(assets, tmp_path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path
                        else real(p, mode))  # root may write anywhere: pretend
    fails(capsys, ["certify", "--cfg", cfg], f"out {tmp_path}/run: {tmp_path} is not writable")
    fails(capsys, ["recertify", tmp_path / "x.npz", "--out", tmp_path / "c.tsv"],
          "is not writable")
    assert not (tmp_path / "run").exists()


def test_permission_errors_are_one_line(capsys):
    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/data/x.tar")

    assert run_command("msscale x", denied) == 2
    assert capsys.readouterr().err == "msscale x: error: Permission denied: /data/x.tar\n"
    with pytest.raises(FileNotFoundError):  # a bug, not the user's machine: a traceback
        run_command("msscale x", lambda: open("/nonexistent/x"))


def test_umask_is_kept(tmp_path):
    from msscale.atomic import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o022)
        writing.make_shards("digits", tmp_path / "data", split="test", shard_size=200)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "data" / "dataset.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("damage, message", [
    ("missing", "classifier.checkpoint {ckpt} does not exist"),
    ("garbage", "is not a readable safetensors file"),
    ("directory", "classifier.checkpoint {ckpt} is not a regular file"),
])
def test_bad_classifier_checkpoints(assets, tmp_path, capsys, damage, message):
    ckpt = tmp_path / "w.safetensors"
    if damage == "garbage":
        ckpt.write_bytes(b"\x00" * 100)
    elif damage == "directory":
        ckpt.mkdir()
    cfg = small_yaml(assets, tmp_path / "c")
    fails(capsys, ["certify", "--cfg", cfg, f"classifier.checkpoint={ckpt}"],
          message.format(ckpt=ckpt))
    no_results(tmp_path / "c" / "run")


def test_denoiser_directories_of_another_kind(assets, tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(
        vae)
    shutil.copytree(Path(assets["denoiser"]["path"]) / "scheduler", vae / "scheduler")
    cfg = small_yaml(assets, tmp_path / "c")
    fails(capsys, ["certify", "--cfg", cfg, f"denoiser.path={vae}"],
          f"denoiser.path {vae} holds a AutoencoderKL, not a UNet2DModel")
    broken = tmp_path / "broken"
    shutil.copytree(assets["denoiser"]["path"], broken)
    (broken / "scheduler" / "scheduler_config.json").write_text("{oops")
    fails(capsys, ["certify", "--cfg", cfg, f"denoiser.path={broken}"],
          "scheduler_config.json is not a JSON config")
    (broken / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "UNet2DModel"}')
    fails(capsys, ["certify", "--cfg", cfg, f"denoiser.path={broken}"],
          "unknown scheduler class 'UNet2DModel'")


def test_mixed_image_sizes_are_resized_one_by_one(assets, tmp_path):
    """Shards of several image sizes: each image is resized to the UNet's size, as a batch
    of one size would be, and certification runs."""
    from msscale.certify.shard import stack_images
    from msscale.models.loading import build_smoothed_model
    from msscale.smoothing.schedules import fit_to_denoiser

    root = tmp_path / "pets"
    for label, size in (("a", (10, 12)), ("b", (20, 16))):
        (root / label).mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / "x.png")
    info = writing.make_shards(root, tmp_path / "data", image_size=None)
    assert info["image_size"] is None
    cfg = small_yaml({**assets, "data": {"shards": str(tmp_path / "data")}}, tmp_path)
    assert main(["certify", "--cfg", str(cfg)]) == 0
    assert load_counts(tmp_path / "run" / "counts.npz").index.tolist() == [0, 1]

    from msscale.certify.schema import load_certify_config

    model = build_smoothed_model(load_certify_config(cfg), torch.device("cpu"))
    images = [image for _, image, _ in reading.open_dataset(tmp_path / "data").iter_images(
        [0, 1])]
    batch = stack_images(images, model, torch.device("cpu"))
    for image, resized in zip(images, batch, strict=True):
        assert torch.equal(resized, fit_to_denoiser(image[None], model)[0])
    model.denoiser.fit = "pad"  # pads a batch of one size only
    with pytest.raises(UserError, match="several sizes .* denoiser.fit is pad"):
        stack_images(images, model, torch.device("cpu"))
    model.denoiser.fit = "resize"
    model.denoiser.unet.register_to_config(sample_size=None)
    with pytest.raises(UserError, match="several sizes"):
        stack_images(images, model, torch.device("cpu"))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A PATH whose sbatch fails the way it does when no controller answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact "
        "slurm controller (connect failure)' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_slurm_not_reachable_is_one_line(assets, tmp_path, capsys, fake_slurm, monkeypatch):
    cfg = small_yaml(assets, tmp_path)
    code, err = array(capsys, cfg, tmp_path / "run", "--shards", "1", "--cluster", "slurm")
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot submit to slurm: sbatch: error: Batch job submission failed" in err, err
    assert not list((tmp_path / "run").glob("counts/*"))
    from msscale.finetune.job import submit_finetune

    finetune = Path(__file__).resolve().parents[1] / "configs" / "finetune_digits.yaml"
    with pytest.raises(UserError, match="cannot submit to slurm: sbatch: error: Batch job"):
        submit_finetune(finetune, [f"out={tmp_path}/finetune"], cluster="slurm")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no Slurm installed at all
    code, err = array(capsys, cfg, tmp_path / "run", "--shards", "1", "--cluster", "slurm")
    assert code == 2 and err.count("\n") == 1 and "cannot submit to slurm" in err, err
