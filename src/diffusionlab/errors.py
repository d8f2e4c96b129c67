"""The one exception type for mistakes a user can make in a config or on disk."""


class ConfigError(ValueError):
    """A bad config value, missing file or incompatible choice; the message names the key or path."""
