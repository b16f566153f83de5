"""Mixture-of-experts configs across the bridge: the HF facts, megatron's router settings, refusals.

HF routes each token as ``p = softmax(x Wᵣᵀ)`` over the E experts, keeps
the top k, and (Mixtral; Qwen3-MoE when ``norm_topk_prob``) renormalises them to sum 1, which
equals a softmax over the k largest *logits*: megatron's ``moe_router_score_function
="softmax"`` with ``moe_router_pre_softmax=False``. Without renormalisation (Qwen3-MoE's
``norm_topk_prob: false``) the weights are the top-k of the full softmax:
``moe_router_pre_softmax=True``. The router runs in fp32 (``moe_router_dtype="fp32"``; HF
takes the softmax in fp32 too), routing is dropless (no capacity factor, so no token is
dropped and routing does not depend on the layout), the experts are megatron's
SequentialMLP (``moe_grouped_gemm=False``). The load-balancing loss: transformers adds
``router_aux_loss_coef`` × its aux loss to the training loss only when
``output_router_logits`` is true, so that is megatron's ``moe_aux_loss_coeff`` (else 0);
megatron computes its own aux loss per layer (the same idea, not the same number).
Refused (naming the field): shared experts, grouped / device-limited routing, sigmoid
scores, routed scaling factors, router jitter, and model types known to need those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UnsupportedCheckpointError
from .table import ModelFamily

if TYPE_CHECKING:  # no import cycle: hf_config imports this module
    from .hf_config import HFLlamaArch

# HF config keys of MoE variants megatron's plain top-k softmax router + experts would compute
# differently: key -> (what it is, a value that means "off").
_UNSUPPORTED_MOE_KEYS = {
    "shared_expert_intermediate_size": ("shared experts", 0),
    "n_shared_experts": ("shared experts", 0),
    "num_shared_experts": ("shared experts", 0),
    "n_group": ("grouped (device-limited) routing", 1),
    "topk_group": ("grouped (device-limited) routing", 1),
    "routed_scaling_factor": ("a routed scaling factor", 1.0),
    "router_jitter_noise": ("router jitter noise", 0.0),
}
# model types whose MoE / attention variants the bridge does not compute, and why.
_UNSUPPORTED_MODEL_TYPES = {
    "qwen2_moe": "shared experts (shared_expert_intermediate_size) with a sigmoid shared-expert gate",
    "deepseek_v2": "multi-head latent attention, shared experts (n_shared_experts) and grouped routing (n_group / topk_group)",
    "deepseek_v3": "multi-head latent attention, shared experts (n_shared_experts), sigmoid grouped routing (n_group / topk_group)",
    "gpt_oss": "attention sinks (learned per-head softmax sinks) and biased, clamped SwiGLU experts",
}


def check_moe_variant(hf: dict[str, Any], supported: str) -> None:
    """Refuse MoE variants (by config key or model type) megatron's router here would compute
    differently; ``supported`` lists the supported architectures for the message."""
    model_type = hf.get("model_type")
    if model_type in _UNSUPPORTED_MODEL_TYPES:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported: the bridge does not compute its "
            f"{_UNSUPPORTED_MODEL_TYPES[model_type]}; supported: {supported}."
        )
    for key, (what, off) in _UNSUPPORTED_MOE_KEYS.items():
        if hf.get(key) not in (None, off):
            raise UnsupportedCheckpointError(
                f"{key}={hf[key]!r}: {what} is not supported by the bridge (megatron's plain top-k softmax "
                f"router over routed experts only)."
            )
    if hf.get("scoring_func", "softmax") != "softmax":
        raise UnsupportedCheckpointError(f"scoring_func={hf['scoring_func']!r} is not supported (only 'softmax').")


def parse_moe(family: ModelFamily, hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts facts of a MoE family's config (empty for a dense family)."""
    keys = family.moe
    if keys is None:
        return {}
    key = next((k for k in keys.num_experts if hf.get(k) is not None), keys.num_experts[0])
    experts, topk = int(hf.get(key) or 0), int(hf.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= topk <= experts:
        raise UnsupportedCheckpointError(
            f"{key}={experts} / num_experts_per_tok={topk}: a mixture of experts needs 1 <= "
            "num_experts_per_tok <= the expert count."
        )
    step = int(hf.get(keys.sparse_step) or 1) if keys.sparse_step else 1
    dense = set(hf.get(keys.dense_layers) or ()) if keys.dense_layers else set()
    if step < 1 or not dense <= set(range(num_layers)):
        raise UnsupportedCheckpointError(
            f"{keys.sparse_step}={step} / {keys.dense_layers}={sorted(dense)}: the step must be >= 1 and the "
            f"dense layers in 0..{num_layers - 1}."
        )
    moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    if not any(moe_layers):
        raise UnsupportedCheckpointError(
            f"{keys.sparse_step}={step} / {keys.dense_layers}={sorted(dense)} leave no MoE layer of "
            f"{num_layers}: not supported as a mixture of experts."
        )
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=int(hf[keys.ffn]),
        moe_router_topk=topk,
        norm_topk_prob=bool(hf.get(keys.norm_topk_prob, False)) if keys.norm_topk_prob else True,
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits") else 0.0,
        moe_layers=moe_layers,
    )


def check_expert_layout(arch: "HFLlamaArch", tp: int, ep: int, etp: int, sequence_parallel: bool) -> None:
    if not arch.num_experts:
        if ep > 1 or etp > tp:
            raise UnsupportedCheckpointError(
                f"expert parallelism (ep={ep}, etp={etp}) needs a mixture-of-experts model; this {arch.model_type} "
                "checkpoint is dense."
            )
        return
    field = arch.family.field("experts")
    problems = [f"{field} ({arch.num_experts}) is not divisible by the expert-parallel size ep={ep}"] * bool(
        arch.num_experts % ep
    )
    if arch.moe_ffn_hidden_size % etp:
        problems.append(
            f"{arch.family.field('moe_ffn')} ({arch.moe_ffn_hidden_size}) is not divisible by the expert-tensor-"
            f"parallel size etp={etp}"
        )
    if ep > 1 and tp > 1 and not sequence_parallel:
        problems.append(f"ep={ep} with tp={tp} needs sequence_parallel (megatron's MoE token dispatch requires it)")
    if problems:
        raise UnsupportedCheckpointError(
            f"this {arch.model_type} checkpoint cannot be built at EP={ep}, ETP={etp}: " + "; ".join(problems) + "."
        )


def moe_config_fields(arch: "HFLlamaArch", ep: int = 1, etp: int | None = None) -> dict[str, Any]:
    """megatron's TransformerConfig fields of a parsed MoE config (empty for a dense one): the
    router settings that compute HF's routing (module docstring), dropless SequentialMLP experts
    with the all-to-all token dispatcher, EP / ETP sizes (etp None: megatron's default, TP)."""
    if not arch.num_experts:
        return {}
    fields: dict[str, Any] = dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    if not all(arch.moe_layers):
        fields["moe_layer_freq"] = [int(moe) for moe in arch.moe_layers]
    return fields
