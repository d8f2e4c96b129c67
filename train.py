"""Train a diffusion model: ``python train.py schedule=edm model=unet_ddpmpp`` (Hydra overrides)."""

from diffusionlab.cli.train import main

if __name__ == "__main__":
    main()
