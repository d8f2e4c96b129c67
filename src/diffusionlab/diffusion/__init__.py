"""diffusionlab.diffusion"""
