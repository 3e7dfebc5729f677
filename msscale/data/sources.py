"""Where `make_shards` gets its images: scikit-learn's digits, an image-folder tree, CIFAR-10.

Each source is a list of items (a name, a label, a loader) plus class names and a prefix.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from msscale.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
DIGITS_TEST_SIZE = 360
DIGITS_IMAGE_SIZES = (16, 32)
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
CIFAR_META = "batches.meta"

# What PIL raises for files that are not (whole) images.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Item:
    """One image of a source: a name for messages, its label, and how to load it."""

    name: str
    label: int
    load: Callable[[], Image.Image]


@dataclass
class Source:
    """A resolved source: shard prefix, classes, the items in order, and a description."""

    prefix: str
    class_names: list[str]
    items: list[Item]
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


def _digits_source(split: str, image_size: int | None) -> Source:
    """sklearn's 8x8 digits (values 0..16) as uint8 grey images, upsampled to image_size."""
    from sklearn.datasets import load_digits

    if image_size not in DIGITS_IMAGE_SIZES:
        raise UserError(f"digits: image_size must be 16 or 32, got {image_size}")
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    items = [
        Item(f"digits[{i}]", int(digits.target[i]), functools.partial(Image.fromarray, pixels[i]))
        for i in digits_split_indices(split)
    ]
    return Source(
        prefix="digits",
        class_names=[str(c) for c in range(10)],
        items=items,
        description={"kind": "digits", "split": split},
        image_size=image_size,
    )


def _image_folder_source(root: Path, image_size: int | None) -> Source:
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
            items.append(Item(rel, label, functools.partial(_open_image_file, path)))
    return Source(
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


def _cifar_source(root: Path, split: str, image_size: int | None) -> Source:
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
            items.append(Item(f"{batch_name}[{i}]", label, load))
    return Source(
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


def resolve_source(source: str | os.PathLike, split: str, image_size: int | None) -> Source:
    if str(source) == "digits":
        return _digits_source(split, image_size)
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"source {str(source)!r} is neither 'digits' nor an existing directory")
    if (root / CIFAR_META).is_file():
        return _cifar_source(root, split, image_size)
    return _image_folder_source(root, image_size)
