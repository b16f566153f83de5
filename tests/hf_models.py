"""Tiny Hugging Face causal LMs built from configs (no downloads), for LoRA tests.

Every factory is deterministic in ``seed`` and accepts config overrides (e.g. a different
``hidden_size`` to build a mismatching model). ``save_base`` writes a model so that
``load_base`` gives a fresh copy with the very same weights, as a user would get with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 96

# The Llama-family geometry of the megatron bridge tests: GQA (8 heads in 4 groups) that
# divides over TP=4, weights large enough that a layout mistake cannot hide under atol.
MEGATRON_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=64,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)


# The geometry every tiny decoder shares: 2 layers, hidden 32, 4 query heads in 2 kv groups (GQA).
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)


def _build(cls, config, seed: int, randomise_biases: bool = False):
    torch.manual_seed(seed)
    model = cls(config)
    if randomise_biases:
        # HF initialises biases to zero; give them values so that bias handling is visible.
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2-layer Llama, hidden 32, 4 query heads sharing 2 kv heads (GQA), untied head."""
    kwargs = dict(
        DECODER,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    kwargs.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**kwargs), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """2-layer Qwen2, hidden 32, GQA; q/k/v projections have (non-zero) biases as in Qwen2."""
    kwargs = dict(
        DECODER,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return _build(Qwen2ForCausalLM, Qwen2Config(**kwargs), seed, randomise_biases=True)


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """2-layer Qwen3, hidden 32, GQA, head_dim 12 (not hidden / heads = 8, so that a geometry
    mistake shows); the q/k norm weights are randomised (HF initialises them to 1, which would
    hide a missing or swapped norm weight)."""
    kwargs = dict(
        DECODER,
        head_dim=12,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    model = _build(Qwen3ForCausalLM, Qwen3Config(**kwargs), seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
    return model


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """2-layer GPT-2 (Conv1D layers with [in, out] weights), hidden 32, tied head, no dropout."""
    kwargs = dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    return _build(GPT2LMHeadModel, GPT2Config(**kwargs), seed, randomise_biases=True)


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    """2-layer Mixtral, hidden 32, GQA, 4 SwiGLU experts of width 48, top-2 routing."""
    kwargs = dict(
        DECODER,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    kwargs.update(overrides)
    return _build(MixtralForCausalLM, MixtralConfig(**kwargs), seed)


def tiny_qwen3_moe(seed: int = 0, **overrides) -> Qwen3MoeForCausalLM:
    """2-layer Qwen3-MoE (q/k RMSNorm), hidden 32, GQA, 4 SwiGLU experts of width 24, top-2
    routing with ``norm_topk_prob``; every layer sparse (no ``mlp_only_layers``)."""
    kwargs = dict(
        DECODER,
        moe_intermediate_size=24,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return _build(Qwen3MoeForCausalLM, Qwen3MoeConfig(**kwargs), seed)


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "gpt2": tiny_gpt2}


def save_base(model, directory) -> str:
    """Save ``model`` (config + safetensors weights) into ``directory``; return the path."""
    directory = os.fspath(directory)
    model.save_pretrained(directory)
    return directory


def load_base(directory):
    """A fresh copy of a model written by :func:`save_base`, in eval mode, fp32."""
    model = AutoModelForCausalLM.from_pretrained(os.fspath(directory), dtype=torch.float32)
    model.eval()
    return model


def sample_ids(batch: int = 2, seq: int = 7, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
