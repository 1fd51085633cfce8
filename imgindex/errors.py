"""The product's one error type for wrong job inputs (config, sources, indexes, flags)."""


class ConfigError(ValueError):
    """A job input is wrong; the message says what to change. The command line prints it as one
    line and exits with status 2, before any work is lost."""


def install_hint(extra: str) -> str:
    """How to add an optional extra: imgindex installs from a clone or a wheel built from one (it
    is not on PyPI)."""
    return (f"pip install -c constraints.txt '.[{extra}]' in imgindex's clone, or "
            f"'imgindex-<version>-py3-none-any.whl[{extra}]' from a wheel")
