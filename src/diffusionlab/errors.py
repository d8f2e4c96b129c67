"""Exception types for what a user can cause: a bad config, a bad file, a run that diverges.

The apps turn each of them into one ``error: ...`` line and a non-zero exit
(:func:`diffusionlab.cli.common.run_cli`)."""


class ConfigError(ValueError):
    """A bad config value, missing file or incompatible choice; the message names the key or path."""


class CheckpointError(ConfigError):
    """A checkpoint that is missing, truncated, not a checkpoint, or from another model config."""


class TrainingDiverged(RuntimeError):
    """Training kept producing non-finite values; the message names the likely causes."""
