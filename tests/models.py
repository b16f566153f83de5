"""A tiny megatron-core GPTModel (local spec, CPU) for layout-invariance tests.

2 layers, hidden 64, 4 heads in 2 query groups (GQA), SwiGLU, RMSNorm, RoPE, no biases, fp32,
no dropout, untied embeddings. With ``use_cpu_initialization`` megatron draws every full
(master) weight from the CPU generator on every rank and keeps this rank's slice, so the same
seed gives the same full weights at any TP (fc1 uses stride 2 to keep [gate; up] per shard).
Not at any PP: a later stage draws its own layers first, so they differ from the PP=1 model's.
Call these inside :func:`tests.harness.run_distributed` (parallel state must exist).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from dist_lora.parallel.grads import finalize_lora_grads
from dist_lora.bridges.block_spec import gpt_local_block_spec

VOCAB = 128
SEQ = 16


def tiny_gpt_config(tp: int, sp: bool, **overrides: Any) -> TransformerConfig:
    """The tiny model's config at tensor-parallel size ``tp``, sequence parallel ``sp``."""
    fields: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # required by megatron once pipeline_model_parallel_size > 1
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_tiny_gpt(config: TransformerConfig, vocab_size: int = VOCAB, seq_len: int = SEQ) -> GPTModel:
    """This rank's part of the tiny GPTModel (local spec with SP-capable torch norms, RoPE;
    embedding on the first pipeline stage, final norm and output layer on the last)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_local_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def random_batch(
    seed: int, batch: int = 2, seq: int = SEQ, vocab: int = VOCAB
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of shape [batch, seq], labels the tokens shifted left by one."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch, seq + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def gpt_loss(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (megatron returns the per-token loss, [batch, seq])."""
    return model(tokens, position_ids=None, attention_mask=None, labels=labels).mean()


def train_lora(model: torch.nn.Module, steps: int, seed: int = 100, lr: float = 1e-2) -> torch.optim.Optimizer:
    """``steps`` AdamW steps on the trainable parameters of a LoRA GPTModel (PP=1), on
    :func:`random_batch` ``(seed + step)``, with the per-step TP sum of the replicated factors'
    gradients; returns the optimizer."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = gpt_loss(model, *random_batch(seed + step))
        optimizer.zero_grad()
        loss.backward()
        finalize_lora_grads(model)
        optimizer.step()
    return optimizer


def moe_config(tp: int, ep: int, etp: int = 1, dispatcher: str = "alltoall", **overrides: Any) -> TransformerConfig:
    """The tiny model as a mixture of experts: 4 experts (SequentialMLP, width 96) top-2 in
    every layer, dropless, no load-balancing loss; SP on where TP > 1."""
    fields: dict[str, Any] = dict(
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=96,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=0.0,
    )
    fields.update(overrides)
    return tiny_gpt_config(tp, tp > 1, **fields)


@torch.no_grad()
def fill_weights_by_global_name(model: torch.nn.Module, seed: int = 5, std: float = 0.05) -> None:
    """Give every matrix weight (linears, experts, routers, embeddings) its slice of one full
    tensor drawn from a seed keyed by its global name (GLOBAL layer and expert indices), so the
    model is the same at any TP / EP / expert-TP size: megatron's CPU init draws experts per EP
    rank, which also shifts the random stream of every later layer."""
    from dist_lora.layers.math import init_seed
    from dist_lora.naming import global_module_name
    from dist_lora.parallel import tp

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2 or hasattr(module, "base_layer"):
            continue
        shape = list(weight.shape)
        rank, size = 0, 1
        if getattr(weight, "tensor_model_parallel", False):
            rank, size = tp.group_rank_size(tp.tp_group_of(module))
            shape[weight.partition_dim] *= size
        generator = torch.Generator().manual_seed(init_seed(seed, global_module_name(model, name), "base"))
        full = torch.randn(shape, generator=generator) * std
        if size > 1:
            full = tp.shard(full, weight.partition_dim, rank, size, tp.partition_stride(weight))
        weight.copy_(full)
