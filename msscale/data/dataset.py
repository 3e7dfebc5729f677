"""Reading a data set by global index (docs/design.md §3.1): position in the shard list,
then position inside the shard. `open_dataset` opens a dataset.json (or a brace-expanded
shard URL) as a `Dataset`; `select_indices` lists the images a certification addresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from msscale.atomic import sha256_file
from msscale.data.sources import IMAGE_ERRORS, to_rgb8
from msscale.errors import UserError
from msscale.paths import regular_file

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # read in this order of preference
SHA256 = re.compile(r"[0-9a-f]{64}")


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
        self.verified: dict[int, str] = {}  # shard position -> sha256 of the file as checked

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
        """sha256 over the shards' sha256s in order: of the files where `verify` checked them,
        else the recorded ones, else hashed from the files.

        The same shards give the same fingerprint whether opened by dataset.json or by URL.
        """
        if self.shard_sha256 is None:
            self.shard_sha256 = [sha256_file(existing_shard(s)) for s in self.shards]
        digest = hashlib.sha256()
        for n, recorded in enumerate(self.shard_sha256):
            digest.update(self.verified.get(n, recorded).encode("ascii") + b"\n")
        return digest.hexdigest()

    def shards_holding(self, indices: Iterable[int]) -> list[int]:
        """Positions in `shards` of the shards holding any of `indices` (all when not counted)."""
        if self.shard_counts is None:
            return list(range(len(self.shards)))
        ends = np.cumsum(self.shard_counts)
        wanted = {int(i) for i in indices}
        return sorted({int(np.searchsorted(ends, i, side="right")) for i in wanted
                       if 0 <= i < ends[-1]})

    def verify(self, indices: Iterable[int] | None = None) -> None:
        """Check the shards' sha256 against dataset.json (those holding `indices`, or all);
        UserError names the first that differs. Each file is read once here, before any
        image of it is used, so a changed byte is caught whatever it changes.

        Without a dataset.json there is nothing recorded to check against: only the shards'
        existence is checked, and a warning says so.
        """
        if self.meta is None or self.shard_sha256 is None:
            for shard in self.shards:
                existing_shard(shard)
            log.warning("%s: no dataset.json, so no checksums to verify against", self.spec)
            return
        chosen = range(len(self.shards)) if indices is None else self.shards_holding(indices)
        for n in chosen:
            if n in self.verified:
                continue
            actual = sha256_file(existing_shard(self.shards[n]))
            if actual != self.shard_sha256[n]:
                raise UserError(
                    f"shard {self.shards[n]} does not match {self.spec}: sha256 {actual}, "
                    f"recorded {self.shard_sha256[n]} (changed since make-shards? make the "
                    "shards again)"
                )
            self.verified[n] = actual
        log.info("%s: %d shard(s) match their recorded sha256", self.spec, len(chosen))

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
            with contextlib.closing(read_shard(shard)) as samples:
                for key, sample in samples:
                    index = start + read
                    read += 1
                    if index != wanted[pos]:
                        continue
                    image, label = decode_sample(sample, shard, key, self.num_classes)
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


def existing_shard(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"shard {path} does not exist")
    return path


def read_shard(path: Path) -> Iterator[tuple[str, dict]]:
    """Raw samples (key, {ext: bytes}) of one shard, in order; corruption -> UserError.

    webdataset splits the tar into samples; the file is opened here so that it is closed as
    soon as the caller stops reading (webdataset's own opener leaves that to the GC).
    """
    with open(existing_shard(path), "rb") as stream:
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
    with contextlib.closing(read_shard(path)) as samples:
        return sum(1 for _ in samples)


def decode_sample(
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
            pixels = np.asarray(to_rgb8(image), dtype=np.float32)
    except IMAGE_ERRORS as exc:
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
    regular_file(path, "dataset file")  # a FIFO would block the read below forever
    try:
        meta = json.loads(path.read_text())
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
        name = shard["name"]
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{path}: shards[{n}].name {name!r} is not a file name")
        if not _is_count(shard["count"]) or shard["count"] < 1:
            raise UserError(f"{path}: shards[{n}].count must be a positive integer, "
                            f"got {shard['count']!r}")
        if not isinstance(shard["sha256"], str) or not SHA256.fullmatch(shard["sha256"]):
            raise UserError(f"{path}: shards[{n}].sha256 must be 64 lower-case hex digits, "
                            f"got {shard['sha256']!r}")
    if not _is_count(meta["num_classes"]) or meta["num_classes"] < 2:
        raise UserError(f"{path}: 'num_classes' must be an integer >= 2, "
                        f"got {meta['num_classes']!r}")
    total = sum(s["count"] for s in meta["shards"])
    if total != meta["count"] or not _is_count(meta["count"]):
        raise UserError(f"{path}: 'count' is {meta['count']!r} but the shards hold {total}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _open_json(path: Path) -> Dataset:
    meta = _load_json(path)
    shards = [existing_shard(path.parent / s["name"]) for s in meta["shards"]]
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


def chunks(items, size: int):
    """Lists of `size` consecutive items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
