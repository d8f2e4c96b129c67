"""diffusionlab: diffusion models in EDM's sigma-space, x = s(t) (x0 + sigma(t) n)."""

__version__ = "0.1.0"
