"""The bridge's error for checkpoints, features and layouts it does not support."""

from __future__ import annotations


class UnsupportedCheckpointError(ValueError):
    """The HF checkpoint's architecture, a feature of it, or the requested parallel layout is
    not supported by this bridge; the message says which and what is supported."""
