"""Which cascade certificate: how it spends the level alpha over its stages, and what a
stage decides from its own bounds (docs/design.md §1.2).

- `split` (the default): stage s gets the level alpha * share_s, the shares summing to 1,
  and every interval the stage computes is taken at that level. A stage certifies iff the
  lower bound of its top class reaches p0 and defers otherwise, also inside the
  undecidable band. Valid at alpha whatever the stages decide (the proof is in §1.2).
- `paper`: Jeong & Shin's rule as their code computes it: stage s at alpha / (s + 1),
  abstaining in the undecidable band. Kept to reproduce published tables; it is not valid at
  alpha in the worst case (§1.2, counterexample E1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

SPLIT, PAPER = "split", "paper"
CERTIFICATES = (SPLIT, PAPER)

# What a stage's own bounds say (docs/design.md §1.2, steps 2-4).
CERTIFY, UNDECIDABLE, DEFER = 0, 1, 2


def default_shares(num_stages: int) -> tuple[float, ...]:
    """4/5 of alpha to the largest scale, the other 1/5 evenly over the smaller ones; all of
    it when there is one scale. Most images stop at the largest scale and its level sets
    their radius; on the demo's counts a larger first share kept the radii of the paper's
    rule (which spends all of alpha there) and lost nothing at r = 0 (docs/design.md §1.2)."""
    if num_stages == 1:
        return (1.0,)
    return (0.8,) + (0.2 / (num_stages - 1),) * (num_stages - 1)


@dataclass(frozen=True)
class Certificate:
    """A cascade certificate: `rule` is `split` or `paper`; `shares` (split only) are the
    stages' shares of alpha, largest scale first, None for `default_shares`."""

    rule: str = SPLIT
    shares: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rule not in CERTIFICATES:
            raise ValueError(f"certificate must be one of {', '.join(CERTIFICATES)}, "
                             f"got {self.rule!r}")
        if self.shares is None:
            return
        if self.rule == PAPER:
            raise ValueError("stage shares are for the split certificate; the paper's rule "
                             "spends alpha / (s + 1) at stage s")
        shares = tuple(float(s) for s in _shares(self.shares))
        if not shares or not all(math.isfinite(s) and s > 0 for s in shares):
            raise ValueError(f"stage shares must be positive numbers, got {list(shares)}")
        if abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"stage shares must sum to 1, got {list(shares)} "
                             f"(sum {sum(shares):.6g})")
        object.__setattr__(self, "shares", shares)

    def stage_levels(self, alpha: float, num_stages: int) -> tuple[float, ...]:
        """The level of every interval at stage s = 0 .. num_stages - 1 (largest scale first).

        For `split` their sum never exceeds alpha: the shares are normalised and the levels
        nudged down while floating point would put the sum above it."""
        if self.rule == PAPER:
            return tuple(alpha / (s + 1) for s in range(num_stages))
        shares = self.shares if self.shares is not None else default_shares(num_stages)
        if len(shares) != num_stages:
            raise ValueError(f"{len(shares)} stage shares for {num_stages} scales: give one "
                             "share per scale, largest scale first")
        total = math.fsum(shares)
        levels = [alpha * share / total for share in shares]
        # fsum([*levels, -alpha]) has the sign of the exact sum minus alpha.
        while math.fsum([*levels, -alpha]) > 0:
            levels = [math.nextafter(level, 0.0) for level in levels]
        return tuple(levels)

    def decide(self, lower, upper, p0: float) -> np.ndarray:
        """CERTIFY where the lower bound reaches p0; `paper`: UNDECIDABLE where only the
        upper bound does; DEFER everywhere else."""
        lower, upper = np.asarray(lower), np.asarray(upper)
        band = UNDECIDABLE if self.rule == PAPER else DEFER
        return np.where(lower >= p0, CERTIFY, np.where(upper >= p0, band, DEFER))

    def to_meta(self) -> dict:
        """What counts files record (docs/design.md §3.2)."""
        return {"certificate": self.rule,
                "stage_shares": None if self.shares is None else list(self.shares)}

    @classmethod
    def from_meta(cls, meta: dict) -> Certificate:
        """The certificate counts were written under; files from before the split rule
        existed were certified by the paper's rule."""
        return cls(meta.get("certificate", PAPER), _shares(meta.get("stage_shares")))

    @classmethod
    def from_settings(cls, smoothing: dict) -> Certificate:
        """From a config's `smoothing` section (`certificate`, `stage_shares`)."""
        return cls(smoothing["certificate"], _shares(smoothing["stage_shares"]))


def _shares(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"stage shares must be a list of numbers, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in value):
        raise ValueError(f"stage shares must be a list of numbers, got {value!r}")
    return tuple(value)


#: The default certificate: the split rule with the default shares.
DEFAULT_CERTIFICATE = Certificate()
