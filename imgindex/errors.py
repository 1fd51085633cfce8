"""The product's error types, below every room, so that a caller (the command line, the service)
maps an error by its type, not by where it was raised.

- `ConfigError`: a job input is wrong (config, sources, flags, an index that cannot be used); its
  kinds `NotFound` (what was asked for is not there: the service answers 404) and `Corrupt` (bytes
  that are not what was written: loading an index and `--verify` raise it; rebuild or restore).
- `SampleError`: one sample (an image, an upload) cannot be embedded; its `kind` is the failures
  table's short error class.
"""


class ConfigError(ValueError):
    """A job input is wrong; the message says what to change. The command line prints it as one
    line and exits with status 2, before any work is lost."""


class NotFound(ConfigError):
    """What was asked for is not there: a key, a shard or a sample the index does not hold."""


class Corrupt(ConfigError):
    """A file exists but its bytes are not what was written (a digest, a size or a format that does
    not match): rebuild or restore it."""


class SampleError(Exception):
    """This sample cannot be embedded; `kind` is the failures table's short error class."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def install_hint(extra: str) -> str:
    """How to add an optional extra: imgindex installs from a clone or a wheel built from one (it
    is not on PyPI)."""
    return (f"pip install -c constraints.txt '.[{extra}]' in imgindex's clone, or "
            f"'imgindex-<version>-py3-none-any.whl[{extra}]' from a wheel")
