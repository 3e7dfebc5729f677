"""Data sets as WebDataset tar shards: write them, read them by global index, stream them.

Layout on disk (DESIGN.md §3 "Data"): `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... with
one sample per key (`<key>.png` RGB and `<key>.cls`, the decimal class index; keys are the
zero-padded global index), and beside them `dataset.json`:

    {"count", "num_classes", "class_names", "image_size": [H, W] or null,
     "shards": [{"name", "count", "sha256"}], "source": {...}, "skipped": [...]}

Certification addresses images by their global index: position in the shard list, then
position inside the shard.

- `make_shards` writes shards from scikit-learn's digits, an image-folder tree or a
  CIFAR-10 python batch directory;
- `open_dataset` opens a dataset.json (or a brace-expanded shard URL) as a `Dataset`, which
  yields images by global index, verifies checksums and has a fingerprint;
- `select_indices` lists the images a certification run addresses;
- `make_training_pipeline` is the resampled, shuffled, augmented stream for fine-tuning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from msscale.errors import UserError
from msscale.atomic import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # read in this order of preference
DIGITS_TEST_SIZE = 360
DIGITS_IMAGE_SIZES = (16, 32)
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
CIFAR_META = "batches.meta"
CROP_PADDING = 2

# What PIL raises for files that are not (whole) images.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------
# Sources: where make_shards gets its images from
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One image of a source: a name for messages, its label, and how to load it."""

    name: str
    label: int
    load: Callable[[], Image.Image]


@dataclass
class _Source:
    """A resolved source: shard prefix, classes, the items in order, and a description."""

    prefix: str
    class_names: list[str]
    items: list[_Item]
    description: dict
    image_size: int | None  # resize every image to this square size; None keeps sizes
    skippable: bool = False  # may unreadable items be skipped (image folders only)
    skipped: list[str] = field(default_factory=list)


def digits_split_indices(split: str = "test") -> np.ndarray:
    """Indices into sklearn's `load_digits()` of a split, in shard order.

    The split is fixed: the indices are shuffled with `numpy.random.default_rng(0)`, the last
    360 are "test" and the rest "train"; "all" is every image in sklearn's order.
    """
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    _check_split(split, "digits")
    if split == "all":
        return np.arange(total)
    order = np.random.default_rng(0).permutation(total)
    return order[-DIGITS_TEST_SIZE:] if split == "test" else order[:-DIGITS_TEST_SIZE]


def _check_split(split: str, what: str) -> None:
    if split not in SPLITS:
        raise UserError(f"{what}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _digits_source(split: str, image_size: int | None) -> _Source:
    """sklearn's 8x8 digits (values 0..16) as uint8 grey images, upsampled to image_size."""
    from sklearn.datasets import load_digits

    if image_size not in DIGITS_IMAGE_SIZES:
        raise UserError(f"digits: image_size must be 16 or 32, got {image_size}")
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    items = [
        _Item(f"digits[{i}]", int(digits.target[i]), functools.partial(Image.fromarray, pixels[i]))
        for i in digits_split_indices(split)
    ]
    return _Source(
        prefix="digits",
        class_names=[str(c) for c in range(10)],
        items=items,
        description={"kind": "digits", "split": split},
        image_size=image_size,
    )


def _image_folder_source(root: Path, image_size: int | None) -> _Source:
    """An image-folder tree: one sub-folder per class (sorted names), files sorted by name."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            log.warning("class folder %s holds no files", root / name)
        for path in files:
            rel = path.relative_to(root).as_posix()
            items.append(_Item(rel, label, functools.partial(_open_image_file, path)))
    return _Source(
        prefix=_safe_prefix(root.resolve().name),
        class_names=classes,
        items=items,
        description={"kind": "image_folder", "path": str(root.resolve())},
        image_size=image_size,
        skippable=True,
    )


def _open_image_file(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _safe_prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches that may only rebuild numpy arrays.

    A pickle can name any importable callable (os.system, subprocess.Popen, ...) and have it
    called while loading, so unpickling a downloaded file with the plain `pickle.load` runs
    whatever code its author chose. CIFAR batches need nothing but dicts, lists, bytes and
    numpy arrays, so every global outside the short list below is refused.
    """

    def find_class(self, module: str, name: str):
        allowed = _numpy_pickle_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return allowed[(module, name)]


@functools.lru_cache(maxsize=1)
def _numpy_pickle_globals() -> dict:
    """The globals numpy's own pickles use for arrays and dtypes (numpy 1.x and 2.x names)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    import _codecs

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # bytes in protocol-2 pickles written by py3
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def load_cifar_pickle(path: Path) -> dict:
    """Load one CIFAR-10 python batch (or batches.meta) with the numpy-only unpickler."""
    try:
        with open(path, "rb") as handle:
            data = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"CIFAR-10: missing file {path}") from None
    except pickle.UnpicklingError as exc:
        raise UserError(f"CIFAR-10: refusing to load {path}: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"CIFAR-10: {path} is not a readable CIFAR pickle ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"CIFAR-10: {path} holds a {type(data).__name__}, expected a dict")
    return data


def _cifar_field(batch: dict, key: str, path: Path):
    """batch[b"key"] (CIFAR's own pickles) or batch["key"]; UserError naming both if absent."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise UserError(f"CIFAR-10: {path} has no key {key!r}")


def _cifar_source(root: Path, split: str, image_size: int | None) -> _Source:
    """A CIFAR-10 python batch directory: data_batch_1..5 = train, test_batch = test."""
    _check_split(split, "CIFAR-10")
    meta = load_cifar_pickle(root / CIFAR_META)
    names = _cifar_field(meta, "label_names", root / CIFAR_META)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    batches = {"train": CIFAR_TRAIN_BATCHES, "test": CIFAR_TEST_BATCHES}
    chosen = batches[split] if split != "all" else CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES
    items = []
    for batch_name in chosen:
        images, labels = _cifar_batch(root / batch_name, len(class_names))
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            load = functools.partial(Image.fromarray, image)
            items.append(_Item(f"{batch_name}[{i}]", label, load))
    return _Source(
        prefix="cifar10",
        class_names=class_names,
        items=items,
        description={"kind": "cifar10", "path": str(root.resolve()), "split": split},
        image_size=image_size,
    )


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Images [N,32,32,3] uint8 and labels of one CIFAR-10 batch file, validated."""
    batch = load_cifar_pickle(path)
    data = np.asarray(_cifar_field(batch, "data", path))
    labels = [int(x) for x in _cifar_field(batch, "labels", path)]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise UserError(
            f"CIFAR-10: {path}: 'data' has shape {data.shape}, expected "
            f"[{len(labels)}, 3072] for {len(labels)} labels"
        )
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise UserError(f"CIFAR-10: {path}: label {bad[0]} outside 0..{num_classes - 1}")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _resolve_source(source: str | os.PathLike, split: str, image_size: int | None) -> _Source:
    if str(source) == "digits":
        return _digits_source(split, image_size)
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"source {str(source)!r} is neither 'digits' nor an existing directory")
    if (root / CIFAR_META).is_file():
        return _cifar_source(root, split, image_size)
    return _image_folder_source(root, image_size)


# --------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------


def make_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    image_size: int | None = 16,
    shard_size: int = 1000,
    skip_bad: bool = False,
) -> dict:
    """Write `source` as WebDataset shards plus dataset.json into `out_dir`; return the json.

    source: "digits" (scikit-learn's digits, fixed split, image_size 16 or 32), an image-folder
    tree (one sub-folder per class) or a CIFAR-10 python batch directory. `split` ("train",
    "test" or "all") applies to digits and CIFAR-10. `image_size` resizes every image to a
    square of that size (bilinear); None keeps the source's sizes. Unreadable images in a
    folder raise UserError naming the file, or with `skip_bad` are logged and listed under
    "skipped". Shards are written into a temporary directory, renamed into place, and
    dataset.json is written last, so a failed run never leaves a dataset.json behind that
    points at partial shards.
    """
    if shard_size < 1:
        raise UserError(f"shard_size must be at least 1, got {shard_size}")
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size must be positive or None, got {image_size}")
    resolved = _resolve_source(source, split, image_size)
    if not resolved.items:
        raise UserError(f"source {str(source)!r} holds no images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".make-shards-"))
    try:
        shards, sizes = _write_shards(resolved, staging, shard_size, skip_bad)
        for shard in shards:
            shard["sha256"] = sha256_file(staging / shard["name"])
        info = _dataset_info(resolved, shards, sizes)
        _install_shards(staging, out_dir, resolved.prefix, [s["name"] for s in shards])
        atomic_write_text(out_dir / DATASET_JSON, json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "wrote %d images in %d shards to %s (%d skipped)",
        info["count"], len(shards), out_dir, len(resolved.skipped),
    )
    return info


def _write_shards(
    source: _Source, staging: Path, shard_size: int, skip_bad: bool
) -> tuple[list[dict], set[tuple[int, int]]]:
    """Write the readable items into staging/<prefix>-%06d.tar; return shard records, sizes."""
    counts: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    pattern = str(staging / f"{source.prefix}-%06d.tar")
    index = 0
    # mtime=0 makes the tars (and so their sha256) reproducible from the same source.
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0,
                         mtime=0) as writer:
        for item in source.items:
            image = _load_item(item, source, skip_bad)
            if image is None:
                continue
            writer.write({"__key__": f"{index:06d}", "png": image, "cls": item.label})
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            sizes.add((image.height, image.width))
            index += 1
    if index == 0:
        raise UserError("no readable images: every image of the source was skipped")
    return [{"name": name, "count": n} for name, n in counts.items()], sizes


def _load_item(item: _Item, source: _Source, skip_bad: bool) -> Image.Image | None:
    """The item as an RGB image of the target size; None if unreadable and skip_bad."""
    try:
        image = item.load().convert("RGB")
        size = source.image_size
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return image
    except _IMAGE_ERRORS as exc:
        if not (source.skippable and skip_bad):
            hint = " (skip_bad / --skip-bad skips unreadable images)" if source.skippable else ""
            raise UserError(f"cannot read image {item.name}: {exc}{hint}") from None
        log.warning("skipping unreadable image %s: %s", item.name, exc)
        source.skipped.append(item.name)
        return None


def _dataset_info(source: _Source, shards: list[dict], sizes: set[tuple[int, int]]) -> dict:
    image_size = list(next(iter(sizes))) if len(sizes) == 1 else None
    return {
        "count": sum(s["count"] for s in shards),
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "image_size": image_size,
        "shards": shards,
        "source": source.description,
        "skipped": source.skipped,
    }


def _install_shards(staging: Path, out_dir: Path, prefix: str, names: list[str]) -> None:
    """Move the finished shards into out_dir, dropping an old dataset.json and stale shards.

    The old dataset.json goes first: while shards are being swapped no dataset.json exists.
    """
    (out_dir / DATASET_JSON).unlink(missing_ok=True)
    stale = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    for old in out_dir.iterdir():
        if stale.fullmatch(old.name) and old.name not in names:
            log.info("removing stale shard %s", old)
            old.unlink()
    for name in names:
        os.replace(staging / name, out_dir / name)


# --------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------


class Dataset:
    """Shards in order, with per-shard counts and checksums when a dataset.json is known.

    Attributes: `shards` (paths, in order), `shard_counts` (list or None until counted),
    `shard_sha256` (recorded checksums or None), `meta` (the dataset.json dict or None),
    `num_classes`, `class_names`, `image_size` (None where unknown).
    """

    def __init__(
        self,
        spec: str,
        shards: list[Path],
        meta: dict | None = None,
        shard_counts: list[int] | None = None,
        shard_sha256: list[str] | None = None,
    ):
        self.spec = spec
        self.shards = shards
        self.meta = meta
        self.shard_counts = shard_counts
        self.shard_sha256 = shard_sha256
        self.num_classes: int | None = meta.get("num_classes") if meta else None
        self.class_names: list[str] | None = meta.get("class_names") if meta else None
        self.image_size: list[int] | None = meta.get("image_size") if meta else None

    def __repr__(self) -> str:
        return f"Dataset({self.spec!r}, {len(self.shards)} shards)"

    def __len__(self) -> int:
        return self.count

    @property
    def count(self) -> int:
        """Number of images: from dataset.json, else counted in one pass over the shards."""
        if self.shard_counts is None:
            self.shard_counts = [_count_samples(shard) for shard in self.shards]
        return sum(self.shard_counts)

    def fingerprint(self) -> str:
        """sha256 over the shards' sha256s in order (recorded ones, else hashed from the files).

        The same shards give the same fingerprint whether opened by dataset.json or by URL.
        """
        if self.shard_sha256 is None:
            self.shard_sha256 = [sha256_file(_existing_shard(s)) for s in self.shards]
        digest = hashlib.sha256()
        for shard_digest in self.shard_sha256:
            digest.update(shard_digest.encode("ascii") + b"\n")
        return digest.hexdigest()

    def verify(self) -> None:
        """Check every shard's sha256 against dataset.json; UserError names the first bad one.

        Without a dataset.json there is nothing recorded to check against: only the shards'
        existence is checked, and a warning says so.
        """
        if self.meta is None or self.shard_sha256 is None:
            for shard in self.shards:
                _existing_shard(shard)
            log.warning("%s: no dataset.json, so no checksums to verify against", self.spec)
            return
        for shard, recorded in zip(self.shards, self.shard_sha256, strict=True):
            actual = sha256_file(_existing_shard(shard))
            if actual != recorded:
                raise UserError(
                    f"shard {shard} does not match dataset.json: sha256 {actual}, "
                    f"recorded {recorded}"
                )

    def iter_images(self, indices: Iterable[int]) -> Iterator[tuple[int, torch.Tensor, int]]:
        """Yield (global index, float32 image [3,H,W] in [0,1], label) for `indices`.

        Indices are yielded once each, in increasing order. Shards are read sequentially;
        with per-shard counts known, shards holding none of the indices are not opened.
        A corrupt shard or sample, or an index past the end, raises UserError.
        """
        wanted = _sorted_indices(indices)
        if not wanted:
            return
        if self.shard_counts is not None and wanted[-1] >= self.count:
            raise UserError(
                f"image index {wanted[-1]} is out of range: {self.spec} holds {self.count} images"
            )
        pos, start = 0, 0  # next wanted index; global index of the shard's first sample
        for shard_no, shard in enumerate(self.shards):
            if pos == len(wanted):
                return
            known = self.shard_counts[shard_no] if self.shard_counts is not None else None
            end = start + known if known is not None else None  # None: not known yet
            if end is not None and wanted[pos] >= end:
                start = end
                continue
            read = 0
            with contextlib.closing(_read_shard(shard)) as samples:
                for key, sample in samples:
                    index = start + read
                    read += 1
                    if index != wanted[pos]:
                        continue
                    image, label = _decode_sample(sample, shard, key, self.num_classes)
                    yield index, image, label
                    pos += 1
                    if pos == len(wanted) or (end is not None and wanted[pos] >= end):
                        break  # nothing more wanted from this shard
                else:
                    _check_shard_count(shard, read, known)
            start = end if end is not None else start + read
        if pos < len(wanted):
            raise UserError(
                f"image index {wanted[pos]} is out of range: {self.spec} holds {start} images"
            )


def _sorted_indices(indices: Iterable[int]) -> list[int]:
    wanted = sorted({int(i) for i in indices})
    if wanted and wanted[0] < 0:
        raise UserError(f"image index {wanted[0]} is negative")
    return wanted


def _check_shard_count(shard: Path, read: int, known: int | None) -> None:
    if known is not None and read != known:
        raise UserError(f"shard {shard} holds {read} samples but dataset.json says {known}")


def _existing_shard(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"shard {path} does not exist")
    return path


def _read_shard(path: Path) -> Iterator[tuple[str, dict]]:
    """Raw samples (key, {ext: bytes}) of one shard, in order; corruption -> UserError.

    webdataset splits the tar into samples; the file is opened here so that it is closed as
    soon as the caller stops reading (webdataset's own opener leaves that to the GC).
    """
    with open(_existing_shard(path), "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
        samples = wds.tariterators.group_by_keys(files)
        last_key = None
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as exc:  # tarfile, webdataset: anything means an unreadable shard
                raise UserError(
                    f"corrupt shard {path}: unreadable {_where(last_key)} ({_reason(exc)})"
                ) from None
            last_key = sample["__key__"]
            yield last_key, sample
    if not _has_end_of_archive(path):
        raise UserError(f"corrupt shard {path}: truncated {_where(last_key)} (no end-of-archive)")


def _where(last_key: str | None) -> str:
    return f"after key {last_key}" if last_key is not None else "at its first sample"


def _reason(exc: Exception) -> str:
    """The first line of an exception webdataset decorated with stream objects and URLs."""
    first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return first.split(" @ ")[0] or type(exc).__name__


def _has_end_of_archive(path: Path) -> bool:
    """Whether a tar file ends in the two zero blocks every complete tar archive ends with.

    Python's tarfile (and so webdataset) takes a tar cut at a member boundary for a complete,
    shorter archive; this catches such truncated shards when no dataset.json gives counts.
    """
    end = 2 * 512
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size < end or size % 512:
            return False
        handle.seek(size - end)
        return handle.read(end) == bytes(end)


def _count_samples(path: Path) -> int:
    with contextlib.closing(_read_shard(path)) as samples:
        return sum(1 for _ in samples)


def _decode_sample(
    sample: dict, shard: Path | str, key: str, num_classes: int | None = None
) -> tuple[torch.Tensor, int]:
    """A raw sample's (float32 RGB image [3,H,W] in [0,1], label); problems -> UserError."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise UserError(f"shard {shard}: sample {key} has no image (.png/.jpg/.jpeg/.webp)")
    if "cls" not in sample:
        raise UserError(f"shard {shard}: sample {key} has no .cls label")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"shard {shard}: sample {key}.cls is not a decimal integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise UserError(f"shard {shard}: sample {key} has label {label} outside the classes")
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except _IMAGE_ERRORS as exc:
        raise UserError(f"shard {shard}: cannot decode {key}.{ext} ({exc})") from None
    tensor = torch.from_numpy(pixels / 255.0).permute(2, 0, 1).contiguous()
    return tensor, label


def open_dataset(spec: str | os.PathLike) -> Dataset:
    """Open a data set: a dataset.json path, a directory holding one, or a shard URL.

    A URL is brace-expanded the way webdataset does ("data/digits-{000000..000003}.tar") and
    must name local files. If a dataset.json beside those shards lists all of them, their
    counts, checksums and classes are taken from it.
    """
    path = Path(spec)
    if path.is_dir():
        if not (path / DATASET_JSON).is_file():
            raise UserError(f"data directory {path} has no {DATASET_JSON}")
        return _open_json(path / DATASET_JSON)
    if str(spec).endswith(".json"):
        return _open_json(path)
    return _open_urls(str(spec))


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"dataset file {path} is not readable JSON ({exc})") from None
    _check_meta(meta, path)
    return meta


def _check_meta(meta: dict, path: Path) -> None:
    """UserError naming the key if dataset.json lacks what readers rely on."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    for key in ("count", "num_classes", "shards"):
        if key not in meta:
            raise UserError(f"{path}: missing key {key!r}")
    if not isinstance(meta["shards"], list) or not meta["shards"]:
        raise UserError(f"{path}: 'shards' must be a non-empty list")
    for n, shard in enumerate(meta["shards"]):
        missing = [k for k in ("name", "count", "sha256") if not isinstance(shard, dict)
                   or k not in shard]
        if missing:
            raise UserError(f"{path}: shards[{n}] lacks {missing[0]!r}")
        if Path(shard["name"]).name != shard["name"] or shard["name"] in ("", ".", ".."):
            raise UserError(f"{path}: shards[{n}].name {shard['name']!r} is not a file name")
    total = sum(int(s["count"]) for s in meta["shards"])
    if total != meta["count"]:
        raise UserError(f"{path}: 'count' is {meta['count']} but the shards hold {total}")


def _open_json(path: Path) -> Dataset:
    meta = _load_json(path)
    shards = [_existing_shard(path.parent / s["name"]) for s in meta["shards"]]
    return Dataset(
        str(path),
        shards,
        meta=meta,
        shard_counts=[int(s["count"]) for s in meta["shards"]],
        shard_sha256=[s["sha256"] for s in meta["shards"]],
    )


def _open_urls(spec: str) -> Dataset:
    paths = [Path(url) for url in wds.shardlists.expand_urls(spec)]
    if not any(p.is_file() for p in paths):
        raise UserError(f"no shard file matches {spec!r}")
    for p in paths:
        if not p.is_file():
            raise UserError(f"shard {p} (from {spec!r}) does not exist")
    return _with_sidecar_json(spec, paths)


def _with_sidecar_json(spec: str, paths: list[Path]) -> Dataset:
    """Adopt counts and checksums from a dataset.json beside the shards listing all of them."""
    parents = {p.parent for p in paths}
    sidecar = next(iter(parents)) / DATASET_JSON
    if len(parents) != 1 or not sidecar.is_file():
        return Dataset(spec, paths)
    try:
        meta = _load_json(sidecar)
    except UserError as exc:
        log.warning("ignoring %s: %s", sidecar, exc)
        return Dataset(spec, paths)
    entries = {s["name"]: s for s in meta["shards"]}
    if not all(p.name in entries for p in paths):
        return Dataset(spec, paths)
    chosen = [entries[p.name] for p in paths]
    return Dataset(
        spec,
        paths,
        meta=meta,
        shard_counts=[int(s["count"]) for s in chosen],
        shard_sha256=[s["sha256"] for s in chosen],
    )


def select_indices(count: int, skip: int = 1, max_images: int | None = None) -> list[int]:
    """The global indices a certification addresses: 0, skip, 2*skip, ... capped at max_images."""
    if skip < 1:
        raise UserError(f"data.skip must be at least 1, got {skip}")
    if max_images is not None and max_images < 0:
        raise UserError(f"data.max_images must be non-negative or null, got {max_images}")
    indices = list(range(0, max(count, 0), skip))
    return indices if max_images is None else indices[:max_images]


# --------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------


def make_training_pipeline(
    urls: str | os.PathLike | list[str],
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    world_rank: int,
    world_size: int,
    epoch_length: int,
    random_crop: bool = True,
    flip: bool = True,
    shuffle_buffer: int = 1000,
) -> wds.DataPipeline:
    """An endless, reproducible stream of training batches (images [B,3,S,S], labels [B]).

    urls: a shard URL, a dataset.json (or its directory) or a list of shard paths.
    Shards are drawn with replacement from one stream seeded by `seed` alone; process
    `world_rank` of `world_size` takes every world_size-th draw and a DataLoader worker
    every num_workers-th of those, so processes and workers read disjoint draws. Samples
    pass a shuffle buffer, are decoded to float32 in [0,1], resized to `image_size` if they
    differ, randomly cropped (zero-pad 2, crop back) and flipped when asked, and batched
    (full batches only). Shuffle and augmentation are seeded from (seed, rank, worker).

    One pass over the pipeline yields `epoch_length` batches per worker. Each pass of the
    same object draws new shards; a DataLoader without persistent workers copies the object
    per epoch and would repeat the stream, so build a new pipeline per epoch with a new seed
    (the training loop derives it from the global step, which also makes a resumed run
    continue with a fresh, reproducible stream).

    webdataset 1.0's `WebDataset(resampled=True, seed=...)` ignores the seed when drawing
    shards, hence the explicit DataPipeline with `ResampledShards(deterministic=True)`.
    """
    _check_training_args(batch_size, image_size, seed, world_rank, world_size, epoch_length)
    shard_urls = _training_urls(urls)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shard_urls, seed=seed, deterministic=True, worker_seed=_no_offset),
        functools.partial(_every_nth, start=world_rank, step=world_size),
        wds.split_by_worker,
        _samples_of_shards,
        functools.partial(_shuffle_in_worker, bufsize=shuffle_buffer, seed=seed, rank=world_rank),
        wds.map(_decode_training_sample),
        functools.partial(
            _augment_in_worker, image_size=image_size, random_crop=random_crop, flip=flip,
            seed=seed, rank=world_rank,
        ),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return pipeline.with_epoch(epoch_length)


def _check_training_args(batch_size, image_size, seed, world_rank, world_size, epoch_length):
    for name, value in (("batch_size", batch_size), ("image_size", image_size),
                        ("epoch_length", epoch_length), ("world_size", world_size)):
        if int(value) < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0 <= world_rank < world_size:
        raise UserError(f"world_rank {world_rank} is outside 0..{world_size - 1}")
    if int(seed) < 0:
        raise UserError(f"seed must be non-negative, got {seed}")


def _training_urls(urls: str | os.PathLike | list[str]) -> list[str]:
    if isinstance(urls, (list, tuple)):
        return [str(_existing_shard(Path(u))) for u in urls]
    return [str(p) for p in open_dataset(urls).shards]


def _no_offset() -> int:
    """Worker seed for ResampledShards: 0 everywhere, so all processes share one draw stream."""
    return 0


def _every_nth(src: Iterable, *, start: int, step: int) -> Iterator:
    """Items start, start+step, ... of src: this process's share of the shard draws."""
    for n, item in enumerate(src):
        if n % step == start:
            yield item


def _samples_of_shards(src: Iterable[dict]) -> Iterator[dict]:
    """The raw samples of each drawn shard ({"url": path} items), read with `_read_shard`."""
    for item in src:
        for _, sample in _read_shard(Path(item["url"])):
            yield sample


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _stream_seed(seed: int, rank: int, stage: int) -> int:
    """A seed for one (seed, rank, DataLoader worker, stage) stream."""
    return int(np.random.SeedSequence([int(seed), rank, _worker_id(), stage]).generate_state(1)[0])


def _shuffle_in_worker(src: Iterable, *, bufsize: int, seed: int, rank: int) -> Iterator:
    """webdataset's shuffle buffer, seeded per process and worker when iteration starts."""
    rng = random.Random(_stream_seed(seed, rank, stage=1))
    return wds.shuffle(bufsize, rng=rng)(src)


def _decode_training_sample(sample: dict) -> tuple[torch.Tensor, int]:
    return _decode_sample(sample, sample.get("__url__", "?"), sample["__key__"])


def _augment_in_worker(
    src: Iterable, *, image_size: int, random_crop: bool, flip: bool, seed: int, rank: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Resize to image_size if needed, then random crop and flip, seeded per worker."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, rank, stage=2))
    for image, label in src:
        yield _augment(image, image_size, random_crop, flip, generator), label


def _augment(
    image: torch.Tensor, size: int, random_crop: bool, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    if tuple(image.shape[1:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp(0, 1)
    if random_crop:
        padded = F.pad(image, (CROP_PADDING,) * 4)
        top, left = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator).tolist()
        image = padded[:, top:top + size, left:left + size]
    if flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    return image.contiguous()


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels
