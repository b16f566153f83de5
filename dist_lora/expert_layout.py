"""PEFT's stacked layout of per-expert LoRA factors on a fused 3-D expert parameter.

The one home of this layout: the HF-path layer (:class:`dist_lora.layers.parameter.LoraParameter`)
computes its delta with :func:`expert_delta`; consolidation of megatron per-expert adapters into
a PEFT ``target_parameters`` adapter calls :func:`stack_experts`, the inverse load
:func:`unstack_experts`. Pure tensor functions (torch only).

The fused parameter (transformers 5: ``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I], Qwen3-MoE and Mixtral) holds expert e's weight as W_e =
param[e] in ``F.linear`` orientation [out, in], unless the experts module says
``is_transposed`` (then param[e] is [in, out]). Expert e's adapter is A_e [r, in], B_e [out, r]
and PEFT 0.21 (``lora.ParamWrapper``) adds to it

    ΔW_e = s · B_e A_e,        s = alpha / r   (alpha / sqrt(r) with use_rslora; r per expert)

storing the E adapters in two tensors of rank r·E:

    lora_A [r·E, in]:   row   e·r + k  =  A_e[k, :]     (expert-major: E blocks of r rows)
    lora_B [out, r·E]:  column k·E + e =  B_e[:, k]     (rank-major: expert index varies fastest)

The two stackings differ (PEFT reshapes lora_A to [E, r, in] and lora_B to [out, r, E]); a file
written with the same order for both loads without error into PEFT and computes the wrong
experts, so every conversion goes through these functions.

Saved keys (:func:`peft_parameter_key`): PEFT wraps each targeted parameter of a module in its
own ``ParamWrapper``, nesting them in the module's parameter registration order (the first
innermost), so the adapter of ``experts.gate_up_proj`` with ``down_proj`` targeted too is saved
as ``experts.base_layer.lora_A.weight`` and that of ``down_proj`` as ``experts.lora_A.weight``
(transformers 5.24 Qwen3-MoE and Mixtral register gate_up_proj before down_proj).

Gate and up of a gated (SwiGLU) expert: transformers 5.24's Qwen3-MoE and Mixtral experts are
``is_concatenated`` (``gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)``): rows [0, I)
of W_e are gate, [I, 2I) up, the same [gate; up] row order as megatron's per-expert
``linear_fc1`` (unsharded). An interleaved layout (gate0, up0, gate1, up1, ...) is converted
with :func:`gate_up_rows`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

ExpertFactors = Mapping[int, tuple[torch.Tensor, torch.Tensor]]  # {e: (A_e [r, in], B_e [out, r])}


def parameter_geometry(shape: Sequence[int], transposed: bool = False) -> tuple[int, int, int]:
    """(E, in, out) of an adapted parameter as PEFT reads its shape: [E, out, in] (3-D; [E, in,
    out] when its module ``is_transposed``) or [out, in] (2-D, E = 1). Its adapter of per-expert
    rank r has lora_A [r·E, in] and lora_B [out, r·E]. ValueError for other ranks."""
    if len(shape) == 3:
        experts, rows, cols = shape
        return (experts, rows, cols) if transposed else (experts, cols, rows)
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    raise ValueError(f"only 2-D [out, in] and 3-D [experts, out, in] parameters can be adapted (as in PEFT), got shape {tuple(shape)}.")


def stack_experts(factors: ExpertFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors ``{e: (A_e [r, in], B_e [out, r])}`` for e = 0..E-1 -> PEFT's
    ``(lora_A [r·E, in], lora_B [out, r·E])`` (see the module docstring for the order)."""
    experts = sorted(factors)
    if experts != list(range(len(experts))) or not experts:
        raise ValueError(f"expert factors must be given for experts 0..E-1 exactly, got experts {experts}.")
    a_list = [factors[e][0] for e in experts]
    b_list = [factors[e][1] for e in experts]
    r, in_f = a_list[0].shape
    out_f = b_list[0].shape[0]
    for e, (a, b) in enumerate(zip(a_list, b_list)):
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise ValueError(
                f"expert {e}: A {tuple(a.shape)}, B {tuple(b.shape)}; every expert needs A [{r}, {in_f}] and "
                f"B [{out_f}, {r}] (expert 0's shapes)."
            )
    return stack_a(a_list), stack_b(b_list)


def stack_a(a_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """PEFT's ``lora_A`` [r·E, in] from A_e [r, in], e = 0..E-1: expert-major (row e·r + k)."""
    return torch.cat(list(a_list), dim=0)


def stack_b(b_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """PEFT's ``lora_B`` [out, r·E] from B_e [out, r], e = 0..E-1: rank-major (column k·E + e)."""
    out_f, r = b_list[0].shape
    return torch.stack(list(b_list), dim=-1).reshape(out_f, r * len(b_list))  # [out, r, E]


def expert_count(lora_a: torch.Tensor, lora_b: torch.Tensor, r: int) -> int:
    """E from stacked factors of per-expert rank ``r`` (ValueError if the shapes do not stack)."""
    stacked = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != stacked or stacked % r:
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} are not stacked factors of rank "
            f"{r}·E (lora_A [r·E, in], lora_B [out, r·E])."
        )
    return stacked // r


def unstack_experts(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`stack_experts`: PEFT's stacked ``lora_A [r·E, in]``, ``lora_B
    [out, r·E]`` -> ``{e: (A_e [r, in], B_e [out, r])}`` (views where possible)."""
    stacked = lora_a.shape[0]
    if stacked % num_experts or lora_b.shape[1] != stacked:
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not hold {num_experts} experts "
            f"(needs lora_A [r·{num_experts}, in], lora_B [out, r·{num_experts}])."
        )
    r = stacked // num_experts
    a = lora_a.reshape(num_experts, r, lora_a.shape[1])
    b = lora_b.reshape(lora_b.shape[0], r, num_experts)
    return {e: (a[e], b[:, :, e]) for e in range(num_experts)}


def expert_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, scaling: float, transposed: bool = False
) -> torch.Tensor:
    """ΔW [E, out, in] with ΔW[e] = s · B_e A_e (PEFT's ``ParamWrapper.get_delta_weight``), in the
    factors' dtype; ``transposed`` (an ``is_transposed`` experts module): [E, in, out]."""
    stacked = lora_a.shape[0]
    r = stacked // num_experts
    a = lora_a.reshape(num_experts, r, lora_a.shape[1])  # [E, r, in]
    b = lora_b.reshape(lora_b.shape[0], r, num_experts).permute(2, 0, 1)  # [E, out, r]
    delta = torch.bmm(b, a) * scaling
    return delta.transpose(1, 2) if transposed else delta


def peft_parameter_key(module: str, parameter: str, targeted: Sequence[str]) -> str:
    """PEFT's module path of the adapter of ``<module>.<parameter>`` (saved keys are this +
    ``.lora_A.weight`` / ``.lora_B.weight``): ``module`` plus one ``.base_layer`` per targeted
    parameter registered after ``parameter``; ``targeted``: the module's targeted parameter
    names in its registration order (``named_parameters(recurse=False)``)."""
    if parameter not in targeted:
        raise ValueError(f"{parameter!r} is not among the targeted parameters {list(targeted)} of {module!r}.")
    later = len(targeted) - 1 - list(targeted).index(parameter)
    return module + ".base_layer" * later


def gate_up_rows(rows: torch.Tensor, interleaved: bool, inverse: bool = False) -> torch.Tensor:
    """Reorder the first dim of a gated expert's fc1 rows (a weight [2I, ...] or B [2I, r])
    from megatron's [gate; up] to a fused parameter's layout: unchanged for a concatenated one
    (transformers 5.24 Qwen3-MoE, Mixtral), [gate0, up0, gate1, up1, ...] for an interleaved one;
    ``inverse``: back to [gate; up]."""
    if not interleaved:
        return rows
    if rows.shape[0] % 2:
        raise ValueError(f"gate/up rows must be even in number, got {rows.shape[0]}.")
    half = rows.shape[0] // 2
    if inverse:  # [g0, u0, g1, u1, ...] -> [gate; up]
        return torch.cat([rows[0::2], rows[1::2]], dim=0)
    return torch.stack([rows[:half], rows[half:]], dim=1).reshape(rows.shape)
