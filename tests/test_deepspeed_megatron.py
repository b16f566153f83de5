"""A megatron GPTModel with LoRA at TP=2 under DeepSpeed ZeRO-1/2 over 2 data-parallel ranks
(4 processes) trains exactly like the run without DeepSpeed (same batches, our TP sum
``finalize_lora_grads`` + DP all-reduce + global-norm clipping + the same AdamW): the same
losses and the same gathered adapters after 3 steps, replicated factors identical on both TP
ranks, and the TP all-reduces that ``deepspeed_initialize_megatron`` adds counted (ZeRO-1: one
per step; hooks: one per partial tensor). Also with gradient accumulation and (slow) sequence
parallelism. With the fused TP path the replicated factors' gradients are partial per TP rank:
without the TP sum DeepSpeed trains a different model and the TP copies drift apart."""

from __future__ import annotations

import json
import pathlib

from dist_lora.deepspeed import prepare_deepspeed

prepare_deepspeed()

import deepspeed  # noqa: E402  (after prepare_deepspeed; forked ranks inherit the import)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.config import LoraRuntimeConfig  # noqa: E402
from dist_lora.deepspeed.megatron import MegatronMPU, deepspeed_initialize_megatron  # noqa: E402
from dist_lora.parallel.grads import allreduce_data_parallel_grads, clip_grad_norm_, finalize_lora_grads  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config  # noqa: E402
from tests.tp_utils import all_tp_copies, gather_param  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
MODEL = dict(num_attention_heads=8, num_query_groups=4)
STEPS = 3


def _ds_config(stage: int, **zero: object) -> dict:
    with open(CONFIGS / f"zero{stage}_cpu.json") as f:
        config = json.load(f)
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = 2
    config["zero_optimization"].update(zero)
    return config


def _adamw_like(config: dict, params: list) -> torch.optim.Optimizer:
    p = config["optimizer"]["params"]
    return torch.optim.AdamW(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=p["weight_decay"])


def _train(
    mode: str, stage: int, tp_comm: str = "fused", zero: dict | None = None, gas: int = 1, sp: bool = False
) -> tuple:
    """mode "ours": no DeepSpeed; "deepspeed": deepspeed_initialize_megatron; "naive":
    deepspeed.initialize with megatron's groups but no TP sum of the partial gradients."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, runtime_config=LoraRuntimeConfig(tp_comm=tp_comm))
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL)), lora, seed=0)
    config = _ds_config(stage, **(zero or {}))
    config["gradient_accumulation_steps"] = gas
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    if mode == "ours":
        optimizer = _adamw_like(config, params)
        for step in range(STEPS):
            for micro in range(gas):
                loss = gpt_loss(model, *random_batch(100 * step + 10 * micro + dp_rank))
                (loss / gas).backward()
                losses.append(loss.item())
            finalize_lora_grads(model)
            allreduce_data_parallel_grads(model)
            clip_grad_norm_(model, config["gradient_clipping"])
            optimizer.step()
            optimizer.zero_grad()
    else:
        if mode == "deepspeed":
            engine, *_ = deepspeed_initialize_megatron(model, config)
        else:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config, mpu=MegatronMPU())
        with _TpAllReduceCounter() as counter:
            for step in range(STEPS):
                for micro in range(gas):
                    loss = gpt_loss(engine, *random_batch(100 * step + 10 * micro + dp_rank))
                    engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
                    engine.step()  # steps at the accumulation boundary only
                    losses.append(loss.item())
        tp_all_reduces_per_step = counter.calls / STEPS
    adapters, drifted = {}, []
    for name, param in model.named_parameters():
        if param.requires_grad:
            copies = all_tp_copies(param.detach())
            if not getattr(param, "tensor_model_parallel", False) and not all(torch.equal(c, copies[0]) for c in copies):
                drifted.append(name)  # a replicated factor must stay identical on every TP rank
            adapters[name] = gather_param(param)
    return losses, adapters, drifted, (tp_all_reduces_per_step if mode != "ours" else None)


class _TpAllReduceCounter:
    """Counts ``torch.distributed.all_reduce`` calls on megatron's TP group (the LoRA TP sums;
    DeepSpeed's own norm reduction uses the model-parallel group, a different group object)."""

    def __enter__(self) -> "_TpAllReduceCounter":
        self.calls, self._original, group = 0, dist.all_reduce, parallel_state.get_tensor_model_parallel_group()

        def all_reduce(tensor, *args, **kwargs):
            if kwargs.get("group", args[1] if len(args) > 1 else None) is group:
                self.calls += 1
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original


def _run(*args) -> list[tuple]:
    return run_distributed(_train, 4, tp=2, args=args)


@pytest.fixture(scope="module")
def reference() -> list[tuple]:
    results = _run("ours", 1)
    assert not any(drifted for _, _, drifted, _ in results)
    return results


def _max_rel(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


def _assert_same_training(results: list, reference: list) -> None:
    for (losses, adapters, drifted, _), (ref_losses, ref_adapters, _, _) in zip(results, reference):  # every rank
        assert not drifted, f"replicated factors differ between TP ranks: {drifted}"
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        assert _max_rel(adapters, ref_adapters) < 1e-4


# Partial-gradient tensors of the fused path: per layer A of linear_qkv and linear_fc1 (column),
# B of linear_proj and linear_fc2 (row); 2 layers.
PARTIAL = 8


@pytest.mark.parametrize(
    "stage, tp_comm, zero, tp_all_reduces",
    [
        (1, "fused", {}, 1),  # one bucketed TP all-reduce per step, before DeepSpeed's DP reduction
        (2, "fused", {}, PARTIAL),  # one per partial tensor, in hooks before ZeRO-2's bucketing hooks
        pytest.param(1, "fused", {"overlap_comm": True}, PARTIAL, marks=pytest.mark.slow),  # ZeRO-1 on the hook path
        pytest.param(2, "reference", {}, None, marks=pytest.mark.slow),  # complete gradients, nothing to sum
    ],
    ids=["zero1-fused", "zero2-fused", "zero1-overlap_comm-fused", "zero2-reference"],
)
def test_tp2_zero_dp2_trains_like_our_data_parallel_loop(reference, naive, stage, tp_comm, zero, tp_all_reduces) -> None:
    results = _run("deepspeed", stage, tp_comm, zero)
    _assert_same_training(results, reference)
    if tp_all_reduces is not None:  # TP all-reduces per step beyond the model's own (megatron's base layers, loss)
        assert {counted - naive[0][3] for *_, counted in results} == {tp_all_reduces}


@pytest.fixture(scope="module")
def naive() -> list[tuple]:
    """DeepSpeed with megatron's groups but without the TP sum."""
    return _run("naive", 2)


@pytest.fixture(scope="module")
def reference_accumulating() -> list[tuple]:
    return _run("ours", 1, "fused", None, 2)


@pytest.mark.parametrize(
    "stage, zero",
    [
        # ZeRO-1 with overlap_comm keeps earlier micro-batches in param.grad: a hook summing
        # param.grad instead of the incoming gradient would sum them over TP again.
        (1, {"overlap_comm": True}),
        pytest.param(1, {}, marks=pytest.mark.slow),
        pytest.param(2, {}, marks=pytest.mark.slow),
    ],
    ids=["zero1-overlap_comm", "zero1", "zero2"],
)
def test_gradient_accumulation_sums_each_micro_batch_once(reference_accumulating, stage, zero) -> None:
    _assert_same_training(_run("deepspeed", stage, "fused", zero, 2), reference_accumulating)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sequence_parallel_norm_grads_are_summed_too(stage) -> None:
    reference = _run("ours", 1, "fused", None, 1, True)
    _assert_same_training(_run("deepspeed", stage, "fused", None, 1, True), reference)


def test_without_the_tp_sum_deepspeed_trains_a_different_model(reference, naive) -> None:
    losses, adapters, drifted, _ = naive[0]
    assert drifted, "each TP rank steps its replicated factors with its own partial gradient"
    assert _max_rel(adapters, reference[0][1]) > 1e-2
