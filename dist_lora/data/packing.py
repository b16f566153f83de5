"""Pack samples into fixed-length sequences without letting them see each other.

Best-fit decreasing: samples longest first, each into the open sequence with the least room
that still fits it (a new sequence when none does). Each sequence carries, per position,

    tokens        the input ids (``pad`` past the last sample)
    labels        next-token targets, IGNORE on prompts and padding
    position_ids  0, 1, ... restarting at every sample
    document_ids  0, 1, ... the sample's index in the sequence, -1 on padding

and the attention mask is block-diagonal causal: position i sees position j iff j <= i and
both belong to the same sample (padding only sees padding). Without packing each sample has
a sequence of its own, right-padded.
"""

from __future__ import annotations

import bisect

import torch

from .samples import IGNORE, Sample

FIELDS = ("tokens", "labels", "position_ids", "document_ids")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each bin's total length <= capacity (every length must fit)."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free space, bin), kept sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[index], -1))
        if at == len(room):
            bins.append([index])
            bisect.insort(room, (capacity - lengths[index], len(bins) - 1))
        else:
            free, b = room.pop(at)
            bins[b].append(index)
            bisect.insort(room, (free - lengths[index], b))
    return bins


def pack(samples: list[Sample], seq_len: int, packing: bool, pad: int) -> dict[str, torch.Tensor]:
    """The sequences (FIELDS -> [n, seq_len] int64) holding ``samples``, each no longer than seq_len."""
    groups = best_fit_decreasing([len(s) for s in samples], seq_len) if packing else [[i] for i in range(len(samples))]
    out = {name: torch.full((len(groups), seq_len), fill, dtype=torch.long)
           for name, fill in zip(FIELDS, (pad, IGNORE, 0, -1))}
    for row, group in enumerate(groups):
        at = 0
        for doc, index in enumerate(group):
            sample, n = samples[index], len(samples[index])
            out["tokens"][row, at : at + n] = torch.tensor(sample.inputs)
            out["labels"][row, at : at + n] = torch.tensor(sample.labels)
            out["position_ids"][row, at : at + n] = torch.arange(n)
            out["document_ids"][row, at : at + n] = doc
            at += n
    return out


def attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """megatron's boolean mask [b, 1, s, s], True where attention is NOT allowed."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return ~(same & causal)[:, None]
