"""Metrics for a checkpoint or a folder of images: ``python evaluate.py ckpt=...`` / ``images=...``."""

from diffusionlab.cli.evaluate import main

if __name__ == "__main__":
    main()
