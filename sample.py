"""Generate images from a checkpoint: ``python sample.py ckpt=... sampler=heun sampler.nfe=35 n=64``."""

from diffusionlab.cli.sample import main

if __name__ == "__main__":
    main()
