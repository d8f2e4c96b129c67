"""diffusionlab.diffusion: the math in EDM's sigma-space (see docs/architecture.md)."""

from diffusionlab.diffusion.grid_fit import GridFitSettings, fit_discretization

__all__ = ["GridFitSettings", "fit_discretization"]
