"""The error of every release step, and the one place a reader's error becomes it."""

from __future__ import annotations

import contextlib
from typing import Iterator

from ..config import ConfigError


class ConsolidationError(ConfigError):
    """The checkpoint, the HF model directory or the output directory is not usable; the
    message says what is wrong and where."""


@contextlib.contextmanager
def as_consolidation_error() -> Iterator[None]:
    """A ConfigError of a reader (manifest, adapter_config.json, shard files, a DeepSpeed
    checkpoint) re-raised as a ConsolidationError with the same message."""
    try:
        yield
    except ConsolidationError:
        raise
    except ConfigError as e:
        raise ConsolidationError(str(e)) from None
