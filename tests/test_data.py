"""Tests for msscale.data.dataset: writing shards, reading them by global index, validation."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msscale.data import dataset as reading
from msscale.data import shards, sources, stream
from msscale.errors import UserError


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits test split (360 images) in shards of 100."""
    out = tmp_path_factory.mktemp("digits")
    shards.make_shards("digits", out, split="test", image_size=16, shard_size=100)
    return out


def _image_folder(root: Path, per_class: int = 3) -> Path:
    """A tiny image folder: classes 'cat' (RGB 10x12) and 'dog' (grey 10x12)."""
    rng = np.random.default_rng(0)
    for name, mode in (("dog", "L"), ("cat", "RGB")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (10, 12, 3) if mode == "RGB" else (10, 12)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:02d}.png")
    return root


def _cifar_dir(root: Path, n_per_batch: int = 4) -> Path:
    """A fake CIFAR-10 python batch directory, pickled the way CIFAR's files are."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"class{c}".encode() for c in range(10)]
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, handle, protocol=2)
    for batch in [*sources.CIFAR_TRAIN_BATCHES, *sources.CIFAR_TEST_BATCHES]:
        content = {
            b"batch_label": batch.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, n_per_batch)],
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
        }
        with open(root / batch, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return root


def test_digits_round_trip(digits_shards: Path) -> None:
    from sklearn.datasets import load_digits

    info = json.loads((digits_shards / "dataset.json").read_text())
    assert info["count"] == 360 and info["num_classes"] == 10
    assert info["image_size"] == [16, 16]
    assert [s["count"] for s in info["shards"]] == [100, 100, 100, 60]
    assert [s["name"] for s in info["shards"]][0] == "digits-000000.tar"

    dataset = reading.open_dataset(digits_shards / "dataset.json")
    assert dataset.count == 360 and dataset.num_classes == 10
    rows = list(dataset.iter_images(range(dataset.count)))
    assert [i for i, _, _ in rows] == list(range(360))
    expected = load_digits().target[sources.digits_split_indices("test")]
    assert [label for _, _, label in rows] == expected.tolist()
    for _, image, _ in rows[:5]:
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 16, 16)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(image[0], image[1])  # grey converted to RGB


def test_digits_split_is_fixed_and_disjoint() -> None:
    test, train = sources.digits_split_indices("test"), sources.digits_split_indices("train")
    assert len(test) == 360 and len(train) == 1797 - 360
    assert not set(test) & set(train)
    assert np.array_equal(test, sources.digits_split_indices("test"))


def test_sparse_indices_across_shards(digits_shards: Path, monkeypatch) -> None:
    dataset = reading.open_dataset(digits_shards)
    every = {i: (img, label) for i, img, label in dataset.iter_images(range(360))}
    opened = []
    real_read = reading.read_shard
    monkeypatch.setattr(reading, "read_shard", lambda p: (opened.append(p.name), real_read(p))[1])
    wanted = [359, 3, 99, 100, 101, 299, 3]
    rows = list(dataset.iter_images(wanted))
    assert [i for i, _, _ in rows] == [3, 99, 100, 101, 299, 359]
    for index, image, label in rows:
        assert label == every[index][1] and torch.equal(image, every[index][0])
    assert opened == [f"digits-{n:06d}.tar" for n in range(4)]
    opened.clear()
    assert [i for i, _, _ in dataset.iter_images([250])] == [250]
    assert opened == ["digits-000002.tar"]  # shards holding none of the indices are skipped


def test_index_out_of_range(digits_shards: Path) -> None:
    with pytest.raises(UserError, match="360"):
        list(reading.open_dataset(digits_shards).iter_images([360]))


def test_brace_url_matches_json(digits_shards: Path) -> None:
    url = str(digits_shards / "digits-{000000..000003}.tar")
    by_url = reading.open_dataset(url)
    by_json = reading.open_dataset(digits_shards / "dataset.json")
    assert [p.name for p in by_url.shards] == [p.name for p in by_json.shards]
    assert by_url.fingerprint() == by_json.fingerprint()
    assert by_url.count == 360
    by_url.verify()
    by_json.verify()


def test_url_without_json_counts_in_one_pass(digits_shards: Path, tmp_path: Path) -> None:
    for name in ("digits-000001.tar", "digits-000003.tar"):
        (tmp_path / name).write_bytes((digits_shards / name).read_bytes())
    dataset = reading.open_dataset(str(tmp_path / "digits-{000001,000003}.tar"))
    assert dataset.num_classes is None and dataset.count == 160
    assert dataset.shard_counts == [100, 60]
    rows = list(dataset.iter_images([0, 159]))
    assert [i for i, _, _ in rows] == [0, 159]
    reference = reading.open_dataset(digits_shards)
    assert rows[1][2] == next(reference.iter_images([359]))[2]


def test_url_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(UserError, match="nothing-"):
        reading.open_dataset(pattern)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_is_named(digits_shards: Path, tmp_path: Path, cut: str) -> None:
    bad = tmp_path / "digits-000000.tar"
    content = (digits_shards / "digits-000000.tar").read_bytes()
    # a .cls member is one header block and one data block: 20 blocks end a member here
    size = len(content) // 2 + 100 if cut == "mid_member" else 512 * 20
    bad.write_bytes(content[:size])
    with pytest.raises(UserError, match=r"corrupt shard .*digits-000000\.tar.*key 0000"):
        list(reading.open_dataset(str(bad)).iter_images(range(100)))


def test_verify_catches_modified_shard(digits_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in digits_shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    reading.open_dataset(copy).verify()
    shard = copy / "digits-000002.tar"
    content = bytearray(shard.read_bytes())
    content[-2000] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(UserError, match="digits-000002.tar"):
        reading.open_dataset(copy).verify()


def test_sample_without_label_is_named(tmp_path: Path) -> None:
    import webdataset as wds

    shard = tmp_path / "x-000000.tar"
    image = Image.new("RGB", (4, 4))
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "000000", "png": image, "cls": 1})
        writer.write({"__key__": "000001", "png": image})
    with pytest.raises(UserError, match=r"x-000000\.tar.*000001"):
        list(reading.open_dataset(str(shard)).iter_images([0, 1]))


def test_image_folder(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets")
    info = shards.make_shards(root, tmp_path / "out", image_size=None, shard_size=4)
    assert info["class_names"] == ["cat", "dog"] and info["count"] == 6
    assert info["image_size"] == [10, 12]
    rows = list(reading.open_dataset(tmp_path / "out").iter_images(range(6)))
    assert [label for _, _, label in rows] == [0, 0, 0, 1, 1, 1]
    assert tuple(rows[0][1].shape) == (3, 10, 12)
    resized = shards.make_shards(root, tmp_path / "out16", image_size=16)
    assert resized["image_size"] == [16, 16]


def test_unreadable_image_named_or_skipped(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets")
    (root / "dog" / "01b.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"dog/01b\.png"):
        shards.make_shards(root, tmp_path / "out", image_size=8)
    info = shards.make_shards(root, tmp_path / "out", image_size=8, skip_bad=True)
    assert info["skipped"] == ["dog/01b.png"] and info["count"] == 6
    saved = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert saved["skipped"] == ["dog/01b.png"]


def test_failure_midway_leaves_no_dataset_json(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets", per_class=4)
    (root / "dog" / "03.png").write_bytes(b"\x89PNG truncated")  # late in the order
    out = tmp_path / "out"
    with pytest.raises(UserError, match="03.png"):
        shards.make_shards(root, out, image_size=8, shard_size=1)
    assert list(out.iterdir()) == []  # no dataset.json, no shards, no staging directory


def test_rerun_replaces_stale_shards(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets")
    shards.make_shards(root, tmp_path / "out", image_size=8, shard_size=1)
    shards.make_shards(root, tmp_path / "out", image_size=8, shard_size=4)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["dataset.json", "pets-000000.tar", "pets-000001.tar"]


def test_cifar_batches(tmp_path: Path) -> None:
    root = _cifar_dir(tmp_path / "cifar")
    info = shards.make_shards(root, tmp_path / "out", split="test", image_size=None)
    assert info["count"] == 4 and info["image_size"] == [32, 32]
    assert info["class_names"][3] == "class3"
    with open(root / "test_batch", "rb") as handle:
        batch = pickle.load(handle)
    rows = list(reading.open_dataset(tmp_path / "out").iter_images(range(4)))
    assert [label for _, _, label in rows] == batch[b"labels"]
    first = batch[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    assert torch.allclose(rows[0][1], torch.from_numpy(first))
    train = shards.make_shards(root, tmp_path / "train", split="train", image_size=16)
    assert train["count"] == 20 and train["image_size"] == [16, 16]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path: Path) -> None:
    root = _cifar_dir(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    with open(root / "test_batch", "wb") as handle:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(UserError, match=r"test_batch.*system"):
        shards.make_shards(root, tmp_path / "out", image_size=None)
    assert not marker.exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="16 or 32"):
        shards.make_shards("digits", tmp_path, image_size=24)
    with pytest.raises(UserError, match="split"):
        shards.make_shards("digits", tmp_path, split="val")
    with pytest.raises(UserError, match="neither"):
        shards.make_shards(tmp_path / "missing", tmp_path)


def test_select_indices() -> None:
    assert reading.select_indices(10) == list(range(10))
    assert reading.select_indices(10, skip=3) == [0, 3, 6, 9]
    assert reading.select_indices(10, skip=3, max_images=2) == [0, 3]
    assert reading.select_indices(0, skip=5) == []
    with pytest.raises(UserError, match="skip"):
        reading.select_indices(10, skip=0)


def test_training_pipeline_is_reproducible(digits_shards: Path) -> None:
    def first_batches(seed: int, rank: int) -> list:
        pipeline = stream.make_training_pipeline(
            digits_shards, batch_size=8, image_size=16, seed=seed, world_rank=rank,
            world_size=2, epoch_length=2,
        )
        return list(pipeline)

    batches = first_batches(seed=5, rank=0)
    assert len(batches) == 2
    images, labels = batches[0]
    assert tuple(images.shape) == (8, 3, 16, 16) and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    again = first_batches(seed=5, rank=0)
    for (images_a, labels_a), (images_b, labels_b) in zip(batches, again, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    other = first_batches(seed=5, rank=1)
    assert not torch.equal(batches[0][0], other[0][0])
