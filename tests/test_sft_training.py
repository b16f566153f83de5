"""Instruction fine-tuning in the training job's own step (`train.run_microbatches`): packed
sequences equal the same samples run one by one (TP=1, TP=2 with SP), masked tokens carry no
gradient, and the loss is the token mean of the global batch at any grad_accum and DP size;
`configs/sft_small.yaml` end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.data import Batch
from dist_lora.data.packing import pack
from dist_lora.data.samples import IGNORE, Sample
from dist_lora.parallel.grads import allreduce_data_parallel_grads, finalize_lora_grads
from dist_lora.train import run_microbatches
from dist_lora.train_config import TrainConfig
from tests.harness import run_distributed
from tests.models import SEQ, VOCAB, build_tiny_gpt, tiny_gpt_config
from tests.tp_utils import gather_param

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def samples(seed: int, lengths: tuple[int, ...]) -> list[Sample]:
    """Random samples whose first third of labels is masked (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(VOCAB, (n + 1,), generator=g).tolist()
        labels = [IGNORE if i < n // 3 else t for i, t in enumerate(ids[1:])]
        out.append(Sample(ids[:-1], labels))
    return out


def rows_batch(rows: dict, index: slice | list) -> Batch:
    return Batch(*(rows[k][index] for k in ("tokens", "labels", "position_ids", "document_ids")))


def lora_gpt(sp: bool = False):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp)), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), seed=0)


def step(model, micro_batches: list[Batch]) -> tuple[float, dict]:
    """One training step's loss (averaged over data-parallel ranks) and gathered gradients."""
    config = TrainConfig()
    config.data.seq_len, config.train.micro_batch_size = SEQ, micro_batches[0].tokens.shape[0]
    loss = torch.tensor(run_microbatches(model, micro_batches, config))
    finalize_lora_grads(model)
    allreduce_data_parallel_grads(model)
    group = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(loss, group=group)
    grads = {n: _gathered_grad(p) for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item() / torch.distributed.get_world_size(group), grads


def _gathered_grad(param) -> torch.Tensor:
    holder = param.detach().clone()
    holder.data = param.grad
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(holder, attr, getattr(param, attr))
    return gather_param(holder)


LENGTHS = (5, 7, 3, 9, 11, 4, 6)


def _packed_vs_one_by_one(sp: bool) -> dict:
    model = lora_gpt(sp)
    data = samples(0, LENGTHS)
    packed = pack(data, SEQ, packing=True, pad=0)
    single = pack(data, SEQ, packing=False, pad=0)
    assert packed["tokens"].shape[0] < len(data) == single["tokens"].shape[0]
    loss_p, grads_p = step(model, [rows_batch(packed, slice(None))])
    loss_s, grads_s = step(model, [rows_batch(single, slice(None))])
    leaky = rows_batch(packed, slice(None))
    leaky.document_ids = torch.where(leaky.document_ids >= 0, 0, -1)  # wrong: one causal block per row
    loss_w, grads_w = step(model, [leaky])
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    return {"loss": abs(loss_p - loss_s), "grads": diff(grads_p, grads_s),
            "wrong_loss": abs(loss_w - loss_s), "wrong_grads": diff(grads_w, grads_s)}


@pytest.mark.parametrize("tp, sp", [(1, False), (2, True)])
def test_packed_equals_one_by_one_and_a_leaky_mask_does_not(tp, sp) -> None:
    result = run_distributed(_packed_vs_one_by_one, tp, tp=tp, args=(sp,))[0]
    assert result["loss"] < 1e-5 and result["grads"] < 1e-5, result
    assert result["wrong_loss"] > 1e-3 and result["wrong_grads"] > 1e-3, result  # the check can fail


def _masked_tokens() -> dict:
    model = lora_gpt()
    rows = pack(samples(1, (16, 16)), SEQ, packing=False, pad=0)
    base = rows_batch(rows, slice(None))
    base.labels = base.labels.clone()
    base.labels[:, 12:] = IGNORE
    changed = Batch(base.tokens.clone(), base.labels.clone(), base.position_ids, base.document_ids)
    changed.tokens[:, 13:] = (changed.tokens[:, 13:] + 1) % VOCAB  # inputs that only masked positions see
    _, grads = step(model, [base])
    _, grads_changed = step(model, [changed])
    unmasked = Batch(base.tokens, rows["labels"].clone(), base.position_ids, base.document_ids)
    _, grads_unmasked = step(model, [unmasked])
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    return {"masked": diff(grads, grads_changed), "unmasked": diff(grads, grads_unmasked)}


def test_masked_tokens_carry_no_gradient() -> None:
    result = run_distributed(_masked_tokens, 1)[0]
    assert result["masked"] == 0.0, result
    assert result["unmasked"] > 1e-4, result


GLOBAL = 8  # sequences in the global batch; uneven trained-token counts per sequence


def _split(accum: int) -> tuple[float, dict]:
    model = lora_gpt()
    rows = pack(samples(2, (15, 4, 9, 16, 2, 12, 7, 10)), SEQ, packing=False, pad=0)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(rank, GLOBAL, dp))
    size = len(mine) // accum
    return step(model, [rows_batch(rows, mine[i * size : (i + 1) * size]) for i in range(accum)])


def test_loss_and_gradients_do_not_depend_on_grad_accum_or_dp() -> None:
    reference_loss, reference = run_distributed(_split, 1, args=(1,))[0]
    for world, accum in [(1, 2), (1, 4), (2, 1), (2, 2)]:
        loss, grads = run_distributed(_split, world, args=(accum,))[0]
        assert loss == pytest.approx(reference_loss, abs=1e-6), (world, accum)
        assert max((grads[k] - reference[k]).abs().max().item() for k in grads) < 1e-6, (world, accum)


def test_sft_small_config_end_to_end(tmp_path) -> None:
    """configs/sft_small.yaml (chat messages, built-in template and data, packing, TP=2) trains,
    lowers the loss and releases an adapter that PEFT loads with the megatron logits."""
    from dist_lora.demo import verify

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DIST_LORA_CACHE": str(tmp_path / "cache")}
    hf_dir = subprocess.check_output(
        [sys.executable, "-c", "from dist_lora.tiny_model import builtin_model_dir as d; print(d())"], env=env, text=True
    ).strip()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dist_lora.cli",
         "train", "--config", os.path.join(ROOT, "configs", "sft_small.yaml"), f"train.out_dir={tmp_path / 'run'}",
         "train.steps=24", "train.eval_interval=12", f"model.hf_dir={hf_dir}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "messages samples" in log and "% padding" in log
    evals = [float(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("step ") and "eval loss" in line]
    assert len(evals) == 2 and evals[1] < evals[0], evals
    assert verify(str(tmp_path / "run"), hf_dir) == 0
