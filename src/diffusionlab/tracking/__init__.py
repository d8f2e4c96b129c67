"""diffusionlab.tracking: where runs are recorded. Loggers (W&B offline by default), a run's name
and group from Hydra, secrets kept out of everything written, ``run.json`` (a training run's
identity beside its checkpoints) and the W&B runs of the sample and evaluate apps."""
