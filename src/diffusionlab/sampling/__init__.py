"""diffusionlab.sampling: from a trained model to images, one path for every app and callback.

``checkpoint.py`` loads a checkpoint (the one loader), ``spec.py`` holds the sampler spec built once
from config, ``conditioning.py`` the condition kinds, ``generator.py`` the generator (denoiser ->
conditioning/guidance -> sampler -> images, latents decoded), ``callbacks.py`` the training-time
sample grid and ``images.py`` the image files people look at."""
