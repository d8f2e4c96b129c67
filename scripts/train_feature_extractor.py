"""Train the domain feature extractor for an embedded dataset and store it in the cache:
``python scripts/train_feature_extractor.py dataset=mnist resolution=16 cache_dir=.cache``
(the same as ``dl-train-extractor``)."""

from diffusionlab.cli.train_extractor import main

if __name__ == "__main__":
    main()
