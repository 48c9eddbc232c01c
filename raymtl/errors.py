"""The error every user-facing fault raises, and the hint it carries for a misspelt name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration or input-data fault, with a message naming what is wrong."""


class DataError(ConfigError):
    """A fault of the data itself (an unreadable image in a strict run, too many of them).

    The data order is deterministic, so a retry would meet it at the same step: runs fail on it
    at once instead of spending `training.max_failures` (`raymtl.train.failures`).
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the choice closest to a misspelt `name`, "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
