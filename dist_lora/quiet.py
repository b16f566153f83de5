"""The one place where third-party chatter that tells a user nothing is silenced."""

from __future__ import annotations


def quiet_datasets() -> None:
    """``datasets`` prints a progress bar per file it converts to Arrow ("Generating train
    split"); our own progress bar covers the work a user waits for."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
