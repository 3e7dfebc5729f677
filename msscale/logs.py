"""Logging set-up, in one place: every command, job and worker logs the same way."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG when verbose) to stderr; leaves a handler that is already there alone."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT,
                        datefmt="%H:%M:%S")
