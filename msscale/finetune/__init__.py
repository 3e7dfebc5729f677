"""Diffusion calibration as a job (docs/design.md §1.4, §3.6): the loop and its parts."""
