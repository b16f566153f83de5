"""Exact collective counts per training step (counts are deterministic, unlike times).

The "frozen base" step trains only the word embedding, so backward runs through every layer
and the base's own collectives all happen; the LoRA steps train the same embedding plus the
adapters. Fused LoRA must add exactly one all-reduce per step (the bucketed sum of the
replicated factors' partial gradients) with SP off, or with SP on when the gathered input is
kept; re-gathering it instead adds one all-gather per column-parallel LoRA layer.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.parallel.comm_counter import CollectiveCounter
from dist_lora.parallel.grads import finalize_lora_grads, tp_partial_grad_parameters
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config

MODEL = dict(num_attention_heads=8, num_query_groups=4)
LAYERS = 2


def _step_counts(sp: bool, mode: str) -> tuple[dict, dict, int]:
    """Collective counts and bytes of one step; `mode` is "base" or a tp_comm choice."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL))
    if mode != "base":
        comm, keep = ("fused", True) if mode == "fused-keep" else (mode, False)
        config = LoraConfig(r=4, lora_alpha=8, runtime_config={"tp_comm": comm, "keep_gathered_input": keep})
        model = get_lora_model(model, config)
    else:
        model.requires_grad_(False)
    model.get_submodule("embedding.word_embeddings" if mode == "base" else "model.embedding.word_embeddings").weight.requires_grad_(True)
    tokens, labels = random_batch(0)
    with CollectiveCounter() as counter:
        gpt_loss(model, tokens, labels).backward()
        finalize_lora_grads(model)
    partial_bytes = sum(p.numel() * p.element_size() for p in tp_partial_grad_parameters(model))
    return dict(counter.counts), dict(counter.bytes), partial_bytes


def _diff(a: dict, b: dict) -> dict:
    out = Counter(a)
    out.subtract(Counter(b))
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("sp", [False, True])
def test_fused_lora_adds_one_collective_per_step(sp: bool) -> None:
    def run() -> dict:
        return {mode: _step_counts(sp, mode) for mode in ("base", "fused", "fused-keep", "reference")}

    results = run_distributed(run, 2, tp=2)[0]
    base_counts, base_bytes, _ = results["base"]
    assert sum(base_counts.values()) > 0
    for mode in ("fused-keep",) + (("fused",) if not sp else ()):
        counts, sizes, partial_bytes = results[mode]
        assert _diff(counts, base_counts) == {"all_reduce": 1}, mode
        assert _diff(sizes, base_bytes) == {"all_reduce": partial_bytes}, mode
    if sp:  # re-gathering the input of each column-parallel LoRA layer (qkv, fc1) in backward
        counts, _, _ = results["fused"]
        assert _diff(counts, base_counts) == {"all_reduce": 1, "all_gather_into_tensor": 2 * LAYERS}
    reference, _, _ = results["reference"]
    extra = sum(reference.values()) - sum(base_counts.values())
    assert extra >= 4 * LAYERS, f"the reference path should add a collective per LoRA layer, added {extra}"


def _count_primitives() -> tuple[dict, dict]:
    import torch.distributed as dist

    rank = dist.get_rank()
    tensor = torch.ones(4)
    with CollectiveCounter() as counter:
        if rank == 0:
            dist.send(tensor, dst=1)
        else:
            dist.recv(tensor, src=0)
        dist.all_gather_into_tensor(torch.empty(8), tensor)
        dist.all_reduce(tensor)
    return dict(counter.counts), dict(counter.bytes)


def test_counter_counts_each_collective_once() -> None:
    """torch's send calls isend and all_gather_into_tensor calls all_gather_single: one call each."""
    (counts0, bytes0), (counts1, _) = run_distributed(_count_primitives, 2)
    assert counts0 == {"send": 1, "all_gather_into_tensor": 1, "all_reduce": 1}
    assert counts1 == {"recv": 1, "all_gather_into_tensor": 1, "all_reduce": 1}
    assert bytes0 == {"send": 16, "all_gather_into_tensor": 32, "all_reduce": 16}


def _clip_counts() -> dict:
    from dist_lora.parallel.grads import clip_grad_norm_

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, False, **MODEL)), LoraConfig(r=4, lora_alpha=8))
    gpt_loss(model, *random_batch(0)).backward()
    finalize_lora_grads(model)
    with CollectiveCounter() as counter:
        clip_grad_norm_(model, 1.0)
    return dict(counter.counts)


def test_gradient_norm_of_a_dense_model_is_one_tp_and_one_pp_all_reduce() -> None:
    """clip_grad_norm_ sums the sharded factors' squares over TP and the total over PP; the
    expert-parallel groups (MoE adapters) cost nothing on a model without experts."""
    assert run_distributed(_clip_counts, 2, tp=2)[0] == {"all_reduce": 2}
