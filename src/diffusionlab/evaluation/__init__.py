"""diffusionlab.evaluation"""
