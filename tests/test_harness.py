"""The multi-process harness (results, errors, hangs) and the tiny GPTModel's layout
invariance: at TP=2 and 4, SP off and on, it gives TP=1's loss, logits and gathered grads."""

from __future__ import annotations

import logging
import threading
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from dist_lora.parallel.cpu_compat import apply_cpu_compat

from tests.harness import DistributedError, run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config
from tests.tp_utils import gather_tp


def _ranks(tag: str) -> tuple[str, int, int, torch.Tensor]:
    rank = dist.get_rank()
    return tag, rank, parallel_state.get_tensor_model_parallel_rank(), torch.full((2,), float(rank))


def test_returns_per_rank_values() -> None:
    results = run_distributed(_ranks, 4, tp=2, args=("x",))
    assert [(tag, rank, tp_rank) for tag, rank, tp_rank, _ in results] == [
        ("x", r, r % 2) for r in range(4)
    ]
    for rank, (*_, tensor) in enumerate(results):
        torch.testing.assert_close(tensor, torch.full((2,), float(rank)))
    assert run_distributed(_ranks, 1, kwargs={"tag": "solo"})[0][:3] == ("solo", 0, 0)


def test_repeated_calls_are_fresh() -> None:
    for i in range(10):
        assert [r[1] for r in run_distributed(_ranks, 2, args=(str(i),))] == [0, 1]


def _raise_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    return dist.get_rank()


def test_exception_carries_traceback() -> None:
    with pytest.raises(DistributedError) as info:
        run_distributed(_raise_on_rank_1, 2, timeout=30)
    message = str(info.value)
    assert "rank 1 raised" in message and "rank 0 raised" not in message
    assert "_raise_on_rank_1" in message and "ValueError: boom from rank 1" in message


def _hang() -> None:
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    threading.Event().wait()  # rank 1 stays alive, so rank 0 hangs instead of seeing a closed peer


def test_hung_collective_times_out_and_leaves_no_processes() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"ranks \[0, 1\] did not finish within 5 s") as info:
        run_distributed(_hang, 2, timeout=5)
    assert time.monotonic() - start < 15
    assert "in all_reduce" in str(info.value) and "in _hang" in str(info.value)  # where they hung
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def _rng_draws() -> tuple[torch.Tensor, torch.Tensor, bool, list[str], bool]:
    tracker_log = logging.getLogger(tensor_parallel.random.__name__)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tracker_log.addHandler(handler)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)  # the model-parallel stream: seeded per TP rank
    restored = torch.equal(before, torch.get_rng_state())
    tracker_log.removeHandler(handler)
    return inside, torch.rand(4), restored, [r.getMessage() for r in records], apply_cpu_compat()


def test_rng_tracker_uses_cpu_generator() -> None:
    (in0, out0, *rest0), (in1, out1, *rest1) = run_distributed(_rng_draws, 2, tp=2)
    assert not torch.equal(in0, in1)  # TP ranks draw different dropout masks inside fork()
    torch.testing.assert_close(out0, out1)  # and the same ones outside
    assert rest0 == rest1 == [True, [], True]  # state restored, no spurious warning, idempotent


def _full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The TP=1-equivalent gradient: sequence-parallel partial sums summed over TP (as
    megatron's finalize_model_grads does), then TP shards gathered."""
    grad = param.grad.clone()
    if getattr(param, "sequence_parallel", False):
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    if getattr(param, "tensor_model_parallel", False):
        grad = gather_tp(grad, param.partition_dim)
    return grad


def _tiny_gpt_run(tp: int, sp: bool) -> dict[str, torch.Tensor]:
    model = build_tiny_gpt(tiny_gpt_config(tp, sp))
    tokens, labels = random_batch(seed=0)
    with torch.no_grad():
        logits = gather_tp(model(tokens, None, None), dim=-1)
    loss = gpt_loss(model, tokens, labels)
    loss.backward()
    grads = {
        f"grad:{name}": _full_grad(param)
        for name, param in model.named_parameters()
        if getattr(param, "partition_stride", 1) == 1  # skip fc1: its shards interleave [gate; up]
    }
    return {"loss": loss.detach(), "logits": logits, **grads}


@pytest.fixture(scope="module")
def tp1_reference() -> dict[str, torch.Tensor]:
    return run_distributed(_tiny_gpt_run, 1, args=(1, False))[0]


@pytest.mark.parametrize(("tp", "sp"), [(2, False), (2, True), (4, False), (4, True)])
def test_tiny_gpt_matches_tp1(tp: int, sp: bool, tp1_reference: dict[str, torch.Tensor]) -> None:
    for rank, result in enumerate(run_distributed(_tiny_gpt_run, tp, tp=tp, args=(tp, sp))):
        assert result.keys() == tp1_reference.keys()
        assert len([k for k in result if "layernorm" in k]) == 5  # 2 per layer + final
        torch.testing.assert_close(result["loss"], tp1_reference["loss"], rtol=1e-5, atol=0)
        for key, expected in tp1_reference.items():
            torch.testing.assert_close(
                result[key], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}"
            )
