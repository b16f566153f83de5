"""The errors and warnings every part of dist_lora raises (re-exported by :mod:`dist_lora.config`).

This module imports nothing from dist_lora, so every module may import it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A LoraConfig value is out of range or inconsistent."""


class DistLoraWarning(UserWarning):
    """Something a user should act on (e.g. a checkpoint in an older format); the CLI prints
    each as one ``dist-lora CMD: warning: ...`` line."""
