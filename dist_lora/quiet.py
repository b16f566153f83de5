"""The one place where third-party chatter that tells a user nothing is silenced.

Filtered by exact message, so every other warning stays visible:

- megatron-core without apex / TransformerEngine announces each fallback to torch (norms,
  optimizers, multi-tensor ops) at import, once per module and per rank;
- megatron-core 0.16's TransformerConfig warns about a cuda-graph scope default it sets itself,
  and about TransformerEngine's fused attention when selective recompute is asked for;
- megatron-core 0.16 calls torch.distributed collectives that torch 2.13 marks deprecated;
- PEFT imports bitsandbytes, which logs that its optional CPU kernel package is missing;
- PEFT reads a transformers attribute that transformers 5 marks deprecated;
- torch's DCP warns that it "assumes the intent" of a single process even when asked for one
  (``no_dist=True``: offline consolidation of an FSDP2 checkpoint);
- ``datasets`` shows a progress bar per file it converts (dist_lora shows its own).
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\. Use empty cuda_graph_scope",
    r".*is_gradient_checkpointing",
    r"If you are using transformer_engine as the transformer implementation, the core_attn",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in a single",
)


def filter_third_party_notices() -> None:
    """Install the filters (idempotent; ``dist_lora`` calls it on import)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_datasets() -> None:
    """``datasets``' per-file progress bars and info logs off (our own bar covers the work)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
