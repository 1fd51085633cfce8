"""The product's one error type for wrong job inputs (config, sources, indexes, flags)."""


class ConfigError(ValueError):
    """A job input is wrong; the message says what to change. The command line prints it as one
    line and exits with status 2, before any work is lost."""
