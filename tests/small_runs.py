"""The training job on configs/cpu_small.yaml inside run_distributed, with the built-in tiny
model in a per-module cache (import ``builtin_model_cache`` into a test module to use it)."""

from __future__ import annotations

import os

import pytest

from dist_lora.train import train
from dist_lora.train_config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "cpu_small.yaml")


@pytest.fixture(scope="module", autouse=True)
def builtin_model_cache(tmp_path_factory) -> None:
    os.environ["DIST_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def run_small(out: str, *overrides: str) -> dict:
    """``train()`` on cpu_small.yaml writing to ``out``, evaluation off; returns its summary."""
    return train(load_train_config(SMALL, (f"train.out_dir={out}", "train.eval_interval=0", *overrides)))
