"""The store handshake (:mod:`dist_lora.parallel.handshake`) on its own, 2 gloo ranks, no model:
repeated calls keep only the last call's keys in the store; a rank that arrives after another
gave up raises at once with the same verdict (not after its own timeout)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from dist_lora.config import ConfigError
from dist_lora.parallel.handshake import all_arrive
from tests.harness import run_distributed


def _three_calls():
    for _ in range(3):
        all_arrive("t", timeout=30)
    dist.barrier()  # both ranks are past call 3's cleanup
    store = dist.group.WORLD.get_group_store()
    keys = [f"dist_lora/t/{call}/{key}" for call in (1, 2, 3) for key in ("0", "1", "arrived", "verdict")]
    return {key: store.check([key]) for key in keys}


def test_only_the_last_call_keeps_its_keys() -> None:
    present = run_distributed(_three_calls, 2, timeout=60)[0]
    assert [key for key, there in present.items() if there] == [
        f"dist_lora/t/3/{key}" for key in ("0", "1", "arrived", "verdict")
    ]


def _late_arrival():
    messages = []
    if dist.get_rank() == 0:
        with pytest.raises(ConfigError, match=r"not called on ranks \[1\] within 1 s") as error:
            all_arrive("t", timeout=1)
        messages.append(str(error.value))
    dist.barrier()  # rank 1 arrives after rank 0 gave up
    if dist.get_rank() == 1:  # a 60 s wait would outlast the harness's 30 s
        with pytest.raises(ConfigError, match=r"not called on ranks \[1\] within 1 s") as error:
            all_arrive("t", timeout=60)
        messages.append(str(error.value))
    return messages


def test_a_rank_arriving_after_the_others_gave_up_fails_at_once() -> None:
    results = run_distributed(_late_arrival, 2, timeout=30)
    assert results[0] == results[1]
