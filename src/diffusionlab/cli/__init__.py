"""diffusionlab.cli"""
