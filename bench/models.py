"""The models the benchmarks run: a Hugging Face Llama (one process) and a megatron-core
GPTModel (tensor parallel under torchrun), both with random weights, fp32, no dropout.

Both are Llama-shaped: SwiGLU MLP (intermediate 2.75 x hidden), RMSNorm, RoPE, grouped-query
attention (16 heads in 8 groups at hidden 1024, head dim 64), untied output head.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)


def add_model_args(p: argparse.ArgumentParser, hidden: int, layers: int, batch: int, seq: int, vocab: int) -> None:
    p.add_argument("--hidden", type=int, default=hidden, help=f"hidden size (default {hidden}); heads = hidden/64")
    p.add_argument("--layers", type=int, default=layers, help=f"transformer layers (default {layers})")
    p.add_argument("--batch", type=int, default=batch, help=f"sequences per step (default {batch})")
    p.add_argument("--seq", type=int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--vocab", type=int, default=vocab, help=f"vocabulary size (default {vocab})")
    p.add_argument("--r", type=int, default=LORA["r"], help=f"LoRA rank (default {LORA['r']}, alpha = 2r)")


def shape(args: argparse.Namespace) -> dict:
    heads = max(args.hidden // 64, 2)
    return dict(hidden=args.hidden, ffn=(args.hidden * 11 // 4 + 127) // 128 * 128, heads=heads,
                groups=max(heads // 2, 1), layers=args.layers, vocab=args.vocab)


def describe(args: argparse.Namespace) -> str:
    s = shape(args)
    return (f"hidden {s['hidden']}, ffn {s['ffn']}, {s['heads']} heads / {s['groups']} kv groups, "
            f"{s['layers']} layers, vocab {s['vocab']}, batch {args.batch} x {args.seq} tokens, fp32")


def batch(args: argparse.Namespace, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), [batch, seq]; labels are the tokens shifted left by one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


# --- Hugging Face Llama (one process) -------------------------------------------------------


def hf_llama(args: argparse.Namespace, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shape(args)
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["groups"], max_position_embeddings=args.seq,
        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.train()
    return model


def hf_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# --- megatron-core GPTModel (tensor parallel) -------------------------------------------------


def megatron_gpt(args: argparse.Namespace, tp: int, sp: bool, seed: int = 0, sdpa: bool = False, **overrides):
    """This rank's part of the GPTModel; the same full weights on every call (CPU init, one seed).
    ``sdpa``: dist_lora's SDPA core attention instead of megatron's local one; ``overrides``:
    more TransformerConfig fields (e.g. recompute settings)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from dist_lora.bridges.block_spec import gpt_local_block_spec

    s = shape(args)
    config = TransformerConfig(
        num_layers=s["layers"], hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, tensor_model_parallel_size=tp,
        sequence_parallel=sp, **overrides,
    )
    torch.manual_seed(seed)
    spec = gpt_local_block_spec(config)
    if sdpa:
        import dataclasses

        from dist_lora.bridges.attention import with_sdpa_attention

        spec = dataclasses.replace(spec, layer_specs=[with_sdpa_attention(layer) for layer in spec.layer_specs])
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=s["vocab"],
        max_sequence_length=args.seq, position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )
    model.train()
    return model


def gpt_variant(args: argparse.Namespace, tp: int, sp: bool, mode: str):
    """(model, its embedding weight) for one contender: "base" (all frozen), or LoRA with
    ``tp_comm`` "fused", "fused-keep" (fused, keep_gathered_input) or "reference". The
    embedding weight is made trainable so that every layer's input needs a gradient, as in
    a model whose lower layers are trained."""
    from dist_lora import LoraConfig, get_lora_model

    model = megatron_gpt(args, tp, sp)
    if mode == "base":
        model.requires_grad_(False)
    else:
        comm, keep = ("fused", True) if mode == "fused-keep" else (mode, False)
        config = LoraConfig(**{**LORA, "r": args.r, "lora_alpha": 2 * args.r},
                            runtime_config={"tp_comm": comm, "keep_gathered_input": keep})
        model = get_lora_model(model, config)
    embedding = model.get_submodule(("" if mode == "base" else "model.") + "embedding.word_embeddings").weight
    embedding.requires_grad_(True)
    return model, embedding


def gpt_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (megatron returns per-token losses)."""
    return model(tokens, position_ids=None, attention_mask=None, labels=labels).mean()


def gpt_saved_bytes(model, args: argparse.Namespace) -> int:
    """Bytes autograd keeps for backward during one forward of ``model`` on :func:`batch`
    (bench/common.SavedTensorMeter); the backward then runs and frees them."""
    import common

    tokens, labels = batch(args)
    with common.SavedTensorMeter(model) as meter:
        loss = gpt_loss(model, tokens, labels)
    loss.backward()
    return meter.bytes
