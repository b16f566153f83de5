"""The built-in models: tiny Llama-family models with random weights, created from a config
(no downloads) and saved as Hugging Face checkpoints in a cache directory: ``llama`` (the
default), ``mixtral`` and ``qwen3_moe`` (mixtures of experts: 4 experts, top-2 routing, for MoE
jobs on CPU; Qwen3-MoE with q/k norms)."""

from __future__ import annotations

import fcntl
import os

from .io import AtomicDirectory

TINY_LLAMA = dict(
    vocab_size=256,  # the built-in byte tokenizer's vocabulary
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_MIXTRAL = dict(
    TINY_LLAMA,
    intermediate_size=128,  # each expert's width
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=None,
)
TINY_QWEN3_MOE = dict(
    TINY_LLAMA,
    moe_intermediate_size=128,  # each expert's width
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)
NAME = "tiny-llama-v1"
# kind -> (directory name, transformers config class, model class, config)
BUILTINS = {
    "llama": (NAME, "LlamaConfig", "LlamaForCausalLM", TINY_LLAMA),
    "mixtral": ("tiny-mixtral-v1", "MixtralConfig", "MixtralForCausalLM", TINY_MIXTRAL),
    "qwen3_moe": ("tiny-qwen3-moe-v1", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", TINY_QWEN3_MOE),
}


def cache_root() -> str:
    return os.environ.get("DIST_LORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dist_lora"))


def builtin_model_dir(root: str | None = None, kind: str = "llama") -> str:
    """The tiny model's checkpoint directory (``kind``: a key of :data:`BUILTINS`), created on
    first use. Safe when several processes (the ranks of one node) ask at once: one creates it
    under a lock, the others wait and reuse it."""
    if kind not in BUILTINS:
        raise ValueError(f"no built-in model {kind!r}; built-in: {', '.join(BUILTINS)}.")
    path = os.path.join(root or cache_root(), BUILTINS[kind][0])
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            _create(path, kind)
    return path


def _create(path: str, kind: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    _, config_class, model_class, fields = BUILTINS[kind]

    with AtomicDirectory(path) as staging:  # replaces a partial directory from an interrupted attempt
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields))
        torch.set_rng_state(generator_state)  # creating the model must not disturb the caller's RNG
        # Written by hand: transformers' save_pretrained writes nothing on a process whose
        # torch.distributed rank is not 0, and any rank may be the one creating the model.
        model.config.architectures = [type(model).__name__]
        model.config.to_json_file(os.path.join(staging, "config.json"))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
