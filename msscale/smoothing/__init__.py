"""Denoised smoothing as mathematics: one-shot denoising, counter-based noise and votes,
the sampling schedules, and the certificates (docs/design.md §1, §2). No files, no jobs."""
