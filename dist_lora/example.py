"""A small tensor-parallel LoRA fine-tune on CPU: the quickest way to see dist_lora work.

    torchrun --nproc-per-node 2 -m dist_lora.example --out runs/example

Builds a tiny megatron GPTModel (random weights) at TP=2, adds LoRA to every attention and
MLP projection, learns a fixed token pattern for a few dozen steps (the loss falls), writes a
sharded adapter checkpoint, and reloads it at TP=2 to check the loss is reproduced.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from dist_lora import LoraConfig, get_lora_model
from dist_lora.checkpoint.sharded import load_sharded, save_sharded
from dist_lora.parallel.grads import finalize_lora_grads
from dist_lora.parallel.setup import init_distributed, is_rank0, shutdown_distributed

VOCAB, SEQ = 256, 32


def build_model(tp: int, sp: bool):
    """The random "pretrained" model; the same weights on every call (they stand in for a checkpoint)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from dist_lora.parallel.norm import gpt_local_block_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, tensor_model_parallel_size=tp, sequence_parallel=sp,
    )
    torch.manual_seed(0)
    return GPTModel(
        config=config, transformer_layer_spec=gpt_local_block_spec(config), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A repeating pattern with a random start: learnable, so the loss visibly falls."""
    start = torch.randint(0, VOCAB, (4, 1), generator=torch.Generator().manual_seed(step))
    ids = (start + 7 * torch.arange(SEQ + 1)) % VOCAB
    return ids[:, :-1], ids[:, 1:]


def loss_of(model, step: int) -> torch.Tensor:
    tokens, labels = batch(step)
    return model(tokens, position_ids=None, attention_mask=None, labels=labels).mean()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/example", help="where the sharded adapter checkpoint goes")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--sequence-parallel", action="store_true", help="turn on sequence parallelism")
    args = parser.parse_args(argv)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed(tp=tp)
    model = get_lora_model(build_model(tp, args.sequence_parallel), LoraConfig(r=8, lora_alpha=16))
    if is_rank0():
        trainable, total = model.get_nb_trainable_parameters()
        print(f"TP={tp} SP={args.sequence_parallel}: {trainable:,} trainable of {total:,} parameters on rank 0")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    from tqdm.auto import tqdm

    bar = tqdm(range(args.steps), disable=not is_rank0(), desc="fine-tuning")
    for step in bar:
        loss = loss_of(model, step)
        loss.backward()
        finalize_lora_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        final = loss_of(model, 10_000).item()
    save_sharded(model, args.out)
    reloaded = get_lora_model(build_model(tp, args.sequence_parallel), LoraConfig(r=8, lora_alpha=16), seed=1)
    load_sharded(reloaded, args.out)
    reloaded.eval()
    with torch.no_grad():
        again = loss_of(reloaded, 10_000).item()
    if is_rank0():
        print(f"held-out loss {final:.4f}; after reloading the checkpoint {again:.4f}")
        print(f"sharded adapter checkpoint: {os.path.abspath(args.out)}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
