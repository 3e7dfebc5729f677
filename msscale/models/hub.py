"""Models named by a Hugging Face hub id: resolved to a local snapshot directory.

A hub id ("owner/name") is fetched with huggingface_hub's snapshot_download into the usual
cache (HF_HOME / HF_HUB_CACHE), only its configs and weights (safetensors, else .bin).
Offline (HF_HUB_OFFLINE=1) a cached snapshot is used as is; with nothing cached the error
names the id and how to fetch it on a machine with network. Everything after resolution
reads a plain local directory, so a run's fingerprint is the hash of the files it read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from msscale.errors import UserError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIGS = ["*.json", "*.txt"]


def download_hint(repo_id: str) -> str:
    return (
        f"fetch it where there is network with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) into the same HF_HOME, then run with "
        "HF_HUB_OFFLINE=1"
    )


def _has_weights(root: Path, suffix: str) -> bool:
    return any(root.rglob(f"*{suffix}"))


def hub_snapshot(repo_id: str, what: str, files: list[str] | None = None) -> Path:
    """The local snapshot of `repo_id` (configs and weights, or exactly `files`)."""
    from huggingface_hub import snapshot_download

    try:
        if files is not None:
            root = Path(snapshot_download(repo_id, allow_patterns=files))
        else:
            root = Path(snapshot_download(repo_id, allow_patterns=[*CONFIGS, "*.safetensors"]))
            if not _has_weights(root, ".safetensors"):  # an older repository: pickled weights
                root = Path(snapshot_download(repo_id, allow_patterns=[*CONFIGS, "*.bin"]))
    except (OSError, ValueError) as err:  # hub errors are OSErrors; a bad id a ValueError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what}: hub id {repo_id} gives nothing ({type(err).__name__}: {reason}); "
            f"{download_hint(repo_id)}"
        ) from None
    # offline, a snapshot whose weights were never fetched still resolves: refuse it here
    complete = all((root / f).is_file() for f in files) if files is not None else (
        _has_weights(root, ".safetensors") or _has_weights(root, ".bin"))
    if not complete:
        raise UserError(f"{what}: the cached snapshot {root} of {repo_id} has no weights; "
                        f"{download_hint(repo_id)}")
    return root


def resolve_dir(name: str, what: str) -> Path:
    """A local directory as it is; a hub id ("owner/name") as its cached snapshot."""
    path = Path(name)
    if path.is_dir():
        return path
    if not HUB_ID.match(name):
        raise UserError(f"{what} {name} is not a directory (nor a hub id, owner/name)")
    root = hub_snapshot(name, f"{what} {name} is not a directory")
    log.info("%s %s: hub snapshot %s", what, name, root)
    return root
