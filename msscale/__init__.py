"""msscale: multi-scale diffusion denoised smoothing at cluster scale."""

__version__ = "0.1.0"
