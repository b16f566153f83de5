"""Each megatron parallel LoRA layer equals a dense single-process reference built from the
gathered weights: y = W x + b + s·(B A x + b_B), forward and backward, at TP=1, 2 and 4,
sequence parallel off and on. Weights are gathered with plain torch.distributed calls."""

from __future__ import annotations


import pytest
import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from dist_lora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear
from dist_lora.parallel.grads import finalize_lora_grads, tp_partial_grad_parameters
from tests.harness import run_distributed
from tests.tp_utils import all_tp_copies, gather_tp, tp_chunk

IN, OUT, R, ALPHA, SEQ, BATCH = 32, 48, 4, 12.0, 8, 2
SCALE = ALPHA / R
RTOL = 1e-5  # relative to the largest value of each reference tensor

COLUMN_CASES = [  # (sequence_parallel, gather_output, lora_bias)
    (False, False, False),
    (False, True, True),
    (True, False, True),
]
ROW_CASES = [  # (sequence_parallel, input_is_parallel, lora_bias)
    (False, True, False),
    (False, False, True),
    (True, True, True),
]


def _config(sp: bool) -> ModelParallelConfig:
    from megatron.core import parallel_state

    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=sp,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def _init(weight: torch.Tensor) -> None:
    torch.nn.init.normal_(weight, std=0.1)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SEQ, BATCH, IN, generator=gen), torch.randn(SEQ, BATCH, OUT, generator=gen)


def _reference(x, w, b, a, b_lora, bias_lora, g):
    """Dense y = W x + b + s (B A x + b_B) and its gradients for loss = Σ y·g."""
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b_lora)]
    bias_leaf = None if bias_lora is None else bias_lora.clone().requires_grad_(True)
    xr, ar, br = leaves
    lora = (xr @ ar.T) @ br.T + (0 if bias_leaf is None else bias_leaf)
    y = xr @ w.T + b + SCALE * lora
    (y * g).sum().backward()
    grads = {"x": xr.grad, "A": ar.grad, "B": br.grad, "bias": None if bias_leaf is None else bias_leaf.grad}
    return y.detach(), grads


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to the largest reference value (fp32 sums of different order)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def _column(sp: bool, gather_output: bool, lora_bias: bool, comm: str) -> dict[str, float]:
    torch.manual_seed(0)
    base = ColumnParallelLinear(IN, OUT, config=_config(sp), init_method=_init, bias=True, gather_output=gather_output)
    with torch.no_grad():
        base.bias.normal_()  # megatron zeroes it; a non-zero bias tests that it is kept
    base.requires_grad_(False)
    keep = comm == "fused-keep"
    layer = LoraColumnParallelLinear(base, tp_comm="fused" if keep else comm, keep_gathered_input=keep)
    layer.update_layer("default", r=R, lora_alpha=ALPHA, init_lora_weights=False, seed=7, lora_bias=lora_bias)
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    x, g = _data(1)
    want, grads = _reference(
        x, gather_tp(base.weight, 0), gather_tp(base.bias, 0), lora_a.weight.detach(),
        gather_tp(lora_b.weight.detach(), 0), None if not lora_bias else gather_tp(lora_b.bias.detach(), 0), g,
    )
    x_local = (tp_chunk(x, 0) if sp else x).clone().requires_grad_(True)
    out, out_bias = layer(x_local)
    assert out_bias is None
    (out * (g if gather_output else tp_chunk(g, -1))).sum().backward()
    finalize_lora_grads(layer)
    errors = {
        "out": _check("out", out, want if gather_output else tp_chunk(want, -1)),
        "dx": _check("dx", x_local.grad, tp_chunk(grads["x"], 0) if sp else grads["x"]),
        "dA": _check("dA", lora_a.weight.grad, grads["A"]),
        "dB": _check("dB", gather_tp(lora_b.weight.grad, 0), grads["B"]),
    }
    if lora_bias:
        errors["dbias"] = _check("dbias", gather_tp(lora_b.bias.grad, 0), grads["bias"])
    copies = all_tp_copies(lora_a.weight.grad)
    errors["dA replicas differ"] = max((c - copies[0]).abs().max().item() for c in copies)
    return errors


def _row(sp: bool, input_is_parallel: bool, lora_bias: bool, comm: str) -> dict[str, float]:
    torch.manual_seed(0)
    base = RowParallelLinear(
        IN, OUT, config=_config(sp), init_method=_init, bias=True,
        input_is_parallel=input_is_parallel, skip_bias_add=False,
    )
    with torch.no_grad():
        base.bias.normal_()
    base.requires_grad_(False)
    layer = LoraRowParallelLinear(base, tp_comm=comm)
    layer.update_layer("default", r=R, lora_alpha=ALPHA, init_lora_weights=False, seed=7, lora_bias=lora_bias)
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    x, g = _data(2)
    want, grads = _reference(
        x, gather_tp(base.weight, 1), base.bias.detach(), gather_tp(lora_a.weight.detach(), 1),
        lora_b.weight.detach(), None if not lora_bias else lora_b.bias.detach(), g,
    )
    x_local = (tp_chunk(x, -1) if input_is_parallel else x).clone().requires_grad_(True)
    out, _ = layer(x_local)
    (out * (tp_chunk(g, 0) if sp else g)).sum().backward()
    finalize_lora_grads(layer)
    errors = {
        "out": _check("out", out, tp_chunk(want, 0) if sp else want),
        "dx": _check("dx", x_local.grad, tp_chunk(grads["x"], -1) if input_is_parallel else grads["x"]),
        "dA": _check("dA", gather_tp(lora_a.weight.grad, 1), grads["A"]),
        "dB": _check("dB", lora_b.weight.grad, grads["B"]),
    }
    if lora_bias:
        errors["dbias"] = _check("dbias", lora_b.bias.grad, grads["bias"])
    copies = all_tp_copies(lora_b.weight.grad)
    errors["dB replicas differ"] = max((c - copies[0]).abs().max().item() for c in copies)
    return errors


def _all_cases(comm: str) -> dict[str, dict[str, float]]:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    results = {}
    for sp, gather, bias in COLUMN_CASES:
        if not (sp and tp == 1):
            results[f"column sp={sp} gather_output={gather} lora_bias={bias}"] = _column(sp, gather, bias, comm)
    for sp, parallel_input, bias in ROW_CASES:
        if not (sp and tp == 1):
            results[f"row sp={sp} input_is_parallel={parallel_input} lora_bias={bias}"] = _row(
                sp, parallel_input, bias, "fused" if comm == "fused-keep" else comm
            )
    return results


@pytest.mark.parametrize("comm", ["fused", "fused-keep", "reference"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_layers_match_dense_reference(tp: int, comm: str) -> None:
    """"fused-keep": fused with the gathered input kept for backward instead of re-gathered."""
    for rank, results in enumerate(run_distributed(_all_cases, tp, tp=tp, args=(comm,))):
        assert results, "no case ran"
        for case, errors in results.items():
            bad = {k: v for k, v in errors.items() if v > (0.0 if "replicas" in k else RTOL)}
            assert not bad, f"TP={tp} rank {rank} {case}: relative errors {bad}"


def _column_dropout_masks_agree(comm: str) -> list[float]:
    torch.manual_seed(0)
    base = ColumnParallelLinear(IN, OUT, config=_config(False), init_method=_init, bias=False)
    base.requires_grad_(False)
    layer = LoraColumnParallelLinear(base, tp_comm=comm)
    layer.update_layer("default", r=R, lora_alpha=ALPHA, lora_dropout=0.5, init_lora_weights=False, seed=7)
    layer.train()
    x, g = _data(3)
    out, _ = layer(x)
    (out * tp_chunk(g, -1)).sum().backward()
    finalize_lora_grads(layer)
    grad = layer.lora_A["default"].weight.grad
    return [(c - grad).abs().max().item() for c in all_tp_copies(grad)]


@pytest.mark.parametrize("comm", ["fused", "reference"])
def test_column_dropout_draws_the_same_mask_on_every_tp_rank(comm: str) -> None:
    """The input of a column-parallel layer is replicated over TP: a different dropout mask
    per rank would train a different A on each rank. dA depends on the mask, so equal dA on
    every rank means equal masks."""
    for diffs in run_distributed(_column_dropout_masks_agree, 2, tp=2, args=(comm,)):
        assert max(diffs) == 0.0


def _partial_names(layer) -> set[str]:
    partial = {id(p) for p in tp_partial_grad_parameters(layer)}
    return {n for n, p in layer.named_parameters() if id(p) in partial}


def _partial_grad_tags_follow_the_layer() -> dict[str, set[str]]:
    base = ColumnParallelLinear(IN, OUT, config=_config(False), init_method=_init, bias=False)
    base.requires_grad_(False)
    layer = LoraColumnParallelLinear(base)
    layer.update_layer("a", r=R, lora_alpha=ALPHA, init_lora_weights=False, seed=7)
    layer.set_adapter(["a", "b"])
    seen = {"fused": _partial_names(layer)}
    layer.set_tp_comm("reference")
    seen["reference"] = _partial_names(layer)
    layer.set_tp_comm("fused")
    layer.update_layer("b", r=R, lora_alpha=ALPHA, init_lora_weights=False, seed=8, use_dora=True)
    layer.set_adapter(["a", "b"])
    seen["with DoRA"] = _partial_names(layer)  # a DoRA adapter sends the whole layer down the reference path
    layer.delete_adapter("b")
    seen["DoRA deleted"] = _partial_names(layer)
    return seen


def test_partial_grad_tags_follow_the_communication_mode_and_dora() -> None:
    """The replicated factors are found by their ``tp_partial_grad`` tag; the tags follow
    set_tp_comm and adding / deleting a DoRA adapter (which switch the fused path on and off)."""
    for seen in run_distributed(_partial_grad_tags_follow_the_layer, 2, tp=2):
        assert seen == {"fused": {"lora_A.a.weight"}, "reference": set(), "with DoRA": set(),
                        "DoRA deleted": {"lora_A.a.weight"}}


def test_partial_grads_are_found_by_parameter_attribute() -> None:
    """Any trainable parameter tagged ``tp_partial_grad`` (or megatron's ``sequence_parallel``) is
    summed per step, whatever module holds it; untagged and frozen ones are not."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.tp_partial_grad = True
    model[1].weight.sequence_parallel = True
    model[1].bias.tp_partial_grad = True
    model[1].bias.requires_grad_(False)
    assert tp_partial_grad_parameters(model) == [model[0].weight, model[1].weight]
    assert tp_partial_grad_parameters(model, include_sequence_parallel=False) == [model[0].weight]
