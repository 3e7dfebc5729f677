"""Writing a data set as WebDataset tar shards plus dataset.json (docs/design.md §3.1).

Shards are written into a staging directory and renamed into place; dataset.json is written
last, so a failed run never leaves a dataset.json that points at partial shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import webdataset as wds
from PIL import Image

from msscale.atomic import atomic_write_text, sha256_file
from msscale.data.dataset import DATASET_JSON
from msscale.data.sources import IMAGE_ERRORS, Item, Source, resolve_source
from msscale.errors import UserError

log = logging.getLogger(__name__)


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
    resolved = resolve_source(source, split, image_size)
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
    source: Source, staging: Path, shard_size: int, skip_bad: bool
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


def _load_item(item: Item, source: Source, skip_bad: bool) -> Image.Image | None:
    """The item as an RGB image of the target size; None if unreadable and skip_bad."""
    try:
        image = item.load().convert("RGB")
        size = source.image_size
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return image
    except IMAGE_ERRORS as exc:
        if not (source.skippable and skip_bad):
            hint = " (skip_bad / --skip-bad skips unreadable images)" if source.skippable else ""
            raise UserError(f"cannot read image {item.name}: {exc}{hint}") from None
        log.warning("skipping unreadable image %s: %s", item.name, exc)
        source.skipped.append(item.name)
        return None


def _dataset_info(source: Source, shards: list[dict], sizes: set[tuple[int, int]]) -> dict:
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
