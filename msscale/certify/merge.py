"""Merge the shards of a certification run into counts.npz, refusing anything inconsistent.

Every shard must be present exactly once, written by the same configuration (seed, n0, n,
scales, schedule, model and data fingerprints), hold exactly the images planned for it, and
for every image the shards' selection and estimation blocks must cover each stream exactly
once. Any violation is a UserError naming the file; nothing is written then.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from msscale.certify.counts import Counts, load_counts, save_counts
from msscale.certify.plan import image_positions, progress_path, shard_files, shard_path
from msscale.errors import UserError
from msscale.smoothing.sampling import block_sizes

PER_SHARD_KEYS = ("shard", "select_blocks", "estimate_blocks")
#: What the merge reads from every shard's metadata (docs/design.md §3.2).
NEEDED_KEYS = ("n0", "n", "noise_block", "alpha", "p0", "skip", "images", "sample_splits",
               *PER_SHARD_KEYS, "shards")


def find_shards(out: str | Path) -> dict[int, Path]:
    """Shard files of a run directory by shard id; the total must agree across names."""
    folder = Path(out) / "counts"
    named = shard_files(out)
    if not named:
        raise UserError(f"no shard files (shard-SSSSS-of-TTTTT.npz) in {folder}")
    examples = {total: p.name for (_, total), p in named.items()}
    if len(examples) > 1:
        raise UserError(
            f"{folder} mixes shard files of runs split {' and '.join(map(str, sorted(examples)))} "
            f"ways (e.g. {', '.join(examples[t] for t in sorted(examples))}): keep one run's"
        )
    total = next(iter(examples))
    shards = {shard: p for (shard, _), p in named.items()}
    missing = [i for i in range(total) if i not in shards]
    if missing:
        progress = progress_path(out, missing[0], total).is_file()
        state = " (unfinished: only its progress file is there)" if progress else ""
        raise UserError(
            f"{shard_path(out, missing[0], total)} is missing{state}; {len(missing)} of "
            f"{total} shards are missing: finish them before merging"
        )
    extra = [i for i in shards if i >= total]
    if extra:
        raise UserError(f"{folder}: shard {extra[0]} is beyond the {total} shards of the run")
    return shards


def _common_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in PER_SHARD_KEYS}


def merge_shards(out: str | Path) -> Counts:
    """Load, validate and combine every shard of the run at `out` (no file is written)."""
    shards = find_shards(out)
    loaded = {i: load_counts(p) for i, p in shards.items()}
    for i, counts in loaded.items():
        _check_needed_meta(counts.meta, shards[i])
    reference = _common_meta(loaded[0].meta)
    for i, counts in loaded.items():
        if counts.meta.get("shard") != i or counts.meta.get("shards") != len(shards):
            raise UserError(
                f"{shards[i]} holds shard {counts.meta.get('shard')} "
                f"of {counts.meta.get('shards')}, "
                f"not shard {i} of {len(shards)} (a copied or renamed file?)"
            )
        diff = sorted(
            k
            for k in set(reference) | set(counts.meta)
            if k not in PER_SHARD_KEYS and reference.get(k) != counts.meta.get(k)
        )
        if diff:
            what = "; ".join(
                f"{k} {counts.meta.get(k)!r} vs {reference.get(k)!r}" for k in diff
            )
            raise UserError(
                f"{shards[i]} is not from the same run as {shards[0].name}: {what}"
            )
        _check_planned(counts, shards[i])
    return _combine(loaded, shards, reference)


def _check_needed_meta(meta: dict, path: Path) -> None:
    """The metadata the merge computes with is there and of the right kind."""
    missing = [key for key in NEEDED_KEYS if key not in meta]
    if missing:
        raise UserError(f"{path}: its metadata lacks {missing} (written by another msscale "
                        "version?): certify that shard again")
    least = {"n0": 1, "n": 1, "noise_block": 1, "skip": 1, "shards": 1, "sample_splits": 1,
             "images": 0, "shard": 0}
    for key, low in least.items():
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{path}: metadata {key} is {value!r}, expected an integer >= {low}")
    if meta["shards"] % meta["sample_splits"]:
        raise UserError(f"{path}: metadata shards {meta['shards']} do not divide into "
                        f"sample_splits {meta['sample_splits']}")
    for key in ("select_blocks", "estimate_blocks"):
        span = meta[key]
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                        for b in span)):
            raise UserError(f"{path}: metadata {key} is {span!r}, expected [start, stop]")


def _check_planned(counts: Counts, path: Path) -> None:
    """A shard must hold exactly the images planned for it (certify/plan.py), each once:
    a shard that lost images would otherwise merge into a run with fewer images."""
    meta = counts.meta
    positions = image_positions(meta["images"], meta["shard"], meta["shards"],
                                meta["sample_splits"])
    planned = positions * meta["skip"]  # the run addresses images 0, skip, 2*skip, ...
    held = counts.index
    if len(np.unique(held)) != len(held):
        raise UserError(f"{path} holds some images twice")
    lacking = np.setdiff1d(planned, held)
    if len(lacking):
        raise UserError(
            f"{path} lacks {len(lacking)} of the {len(planned)} images planned for it "
            f"(first: image {lacking[0]}): certify that shard again"
        )
    extra = np.setdiff1d(held, planned)
    if len(extra):
        raise UserError(f"{path} holds image {extra[0]}, which is not planned for it")


def _combine(loaded: dict[int, Counts], shards: dict[int, Path], meta: dict) -> Counts:
    per_image = defaultdict(list)  # image index -> [(shard id, row)]
    for i, counts in loaded.items():
        for row, image in enumerate(counts.index.tolist()):
            per_image[image].append((i, row))
    expected = {
        "select_blocks": len(block_sizes(meta["n0"], meta["noise_block"])),
        "estimate_blocks": len(block_sizes(meta["n"], meta["noise_block"])),
    }
    first = loaded[0]
    merged = Counts.empty(first.sigmas, first.select.shape[2], meta)
    rows = {"index": [], "label": [], "select": [], "estimate": []}
    for image in sorted(per_image):
        owners = per_image[image]
        for key, total in expected.items():
            _check_cover(image, [(shards[i], loaded[i].meta[key]) for i, _ in owners], key, total)
        labels = {int(loaded[i].label[row]) for i, row in owners}
        if len(labels) > 1:
            raise UserError(
                f"image {image} has different labels in different shards: {sorted(labels)}"
            )
        rows["index"].append(image)
        rows["label"].append(labels.pop())
        rows["select"].append(sum(loaded[i].select[row] for i, row in owners))
        rows["estimate"].append(sum(loaded[i].estimate[row] for i, row in owners))
    if rows["index"]:
        merged.append(
            rows["index"], rows["label"], np.stack(rows["select"]), np.stack(rows["estimate"])
        )
    return merged


def _check_cover(image: int, spans: list[tuple[Path, list[int]]], key: str, total: int) -> None:
    """The shards holding `image` must cover blocks [0, total) of a stream exactly once."""
    covered = np.zeros(total, np.int64)
    for _, (start, stop) in spans:
        covered[start:stop] += 1
    if covered.max(initial=0) > 1:
        files = ", ".join(str(p) for p, (a, b) in spans if b > a)
        raise UserError(f"image {image}: overlapping {key.replace('_', ' ')} in {files}")
    if covered.min(initial=1) < 1:
        raise UserError(
            f"image {image}: {key.replace('_', ' ')} {np.flatnonzero(covered == 0)[0]} "
            f"is in no shard"
        )


def merge_run(out: str | Path) -> Counts:
    """Merge the shards of `out` into out/counts.npz and write the results beside it."""
    from msscale.certify.report import write_results

    counts = merge_shards(out)
    save_counts(counts, Path(out) / "counts.npz")
    write_results(out, counts, counts.meta["alpha"], counts.meta["p0"])
    return counts
