"""The data- and weight-driven inits (EVA, CorDA, LoftQ) on a model built under ZeRO-3's
``zero.Init`` (2 CPU ranks, gloo, configs/zero3_cpu.json).

The flow (dist_lora/parallel/zero_forward.py): adapters and their init BEFORE
``deepspeed.initialize``; EVA's and CorDA's data pass inside ``gathered_forward`` (each
module's weights gathered around its forward), the weight reads and rewrites gathered by the
layers themselves. The reference is the very same flow on the unpartitioned model with plain
data parallelism (both ranks, each its own data; EVA and CorDA sum their statistics over the
world), then training with all-reduced gradients, the same clipping and torch AdamW.

Checked, on every rank: the adapters (gathered) and the rewritten base weights (gathered) equal
the reference's, the base weights are still partitioned afterwards, and two training steps on
the engine give the reference's losses and adapters.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_lora.deepspeed import prepare_deepspeed  # noqa: E402

prepare_deepspeed()  # before DeepSpeed's first use; forked ranks inherit the patched module
import deepspeed  # noqa: E402, F401

from dist_lora import ConfigError, CordaConfig, EvaConfig, LoftQConfig, LoraConfig, get_lora_model  # noqa: E402
from dist_lora.deepspeed import gathered_forward, initialize  # noqa: E402
from dist_lora.parallel import zero  # noqa: E402
from dist_lora.init import initialize_lora_eva_weights, preprocess_corda  # noqa: E402
from dist_lora.parallel.grads import allreduce_data_parallel_grads  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.test_deepspeed_zero import batch, build_base, ds_config, engine_losses, full_adapter  # noqa: E402

WORLD = 2
STEPS = 2
SEED = 0
ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "eva": dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                eva_config=EvaConfig(rho=2.0, tau=0.99)),
    "corda": dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                  corda_config=CordaConfig(corda_method="ipm")),
    "loftq": dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq",
                  loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)),
}


def calibration(rank: int) -> list[dict]:
    """This rank's calibration batches (different on each rank, some tokens masked)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(3):
        ids = torch.randint(hf_models.VOCAB, (2, 12), generator=gen)
        attention = torch.ones_like(ids)
        attention[0, -2:] = 0
        out.append(dict(input_ids=ids, attention_mask=attention))
    return out


def _init(init: str, base: torch.nn.Module) -> torch.nn.Module:
    """The user's flow: inject + init, before any engine (data passes inside gathered_forward)."""
    config = LoraConfig(**CONFIGS[init])
    data = calibration(dist.get_rank())
    if init == "corda":
        with gathered_forward(base):
            preprocess_corda(base, config, run_model=lambda: [base(**b) for b in data])
    lora = get_lora_model(base, config, seed=SEED)
    if init == "eva":
        with gathered_forward(lora):
            initialize_lora_eva_weights(lora, data, show_progress_bar=False)
    return lora


def _snapshot(lora) -> dict:
    bases = {name: layer.base_layer.weight for name, layer in lora.lora_layers()}
    return {
        "adapter": full_adapter(lora),
        "base": zero.full_tensors(bases),
        "partitioned": all(w.data.numel() == 0 for w in bases.values()),
        "rank_pattern": dict(lora.peft_config["default"].rank_pattern),
    }


def _train_plain(lora) -> list[float]:
    config = ds_config(1)
    params = [p for p in lora.parameters() if p.requires_grad]
    hyper = {k: v for k, v in config["optimizer"]["params"].items() if k != "torch_adam"}
    optimizer = torch.optim.AdamW(params, **hyper)
    losses = []
    for step in range(STEPS):
        ids = batch(dist.get_rank(), step)
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        allreduce_data_parallel_grads(lora, dist.group.WORLD)
        torch.nn.utils.clip_grad_norm_(params, config["gradient_clipping"])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _train_zero(lora, config: dict) -> list[float]:
    engine, *_ = initialize(lora, config)
    return engine_losses(engine, STEPS)


def _plain_and_zero3(init: str) -> dict:
    out = {}
    lora = _init(init, build_base(1, {}))
    out["plain"] = _snapshot(lora)
    out["plain"]["losses"] = _train_plain(lora)
    out["plain"]["trained"] = full_adapter(lora)
    config = ds_config(3)
    base = build_base(3, config)
    assert base.model.layers[0].self_attn.q_proj.weight.data.numel() == 0  # really partitioned
    lora = _init(init, base)
    out["zero"] = _snapshot(lora)
    out["zero"]["losses"] = _train_zero(lora, config)
    out["zero"]["trained"] = full_adapter(lora)
    return out


@pytest.mark.parametrize("init", list(CONFIGS))
def test_init_under_zero3_equals_plain_data_parallel(init):
    """Adapters, rewritten base weights and rank pattern equal the unpartitioned flow's; the base
    stays partitioned; two ZeRO-3 steps give the plain run's losses and adapters."""
    results = run_distributed(_plain_and_zero3, WORLD, args=(init,))
    original = dict(hf_models.tiny_llama().named_parameters())
    for rank, result in enumerate(results):
        plain, ours = result["plain"], result["zero"]
        assert ours["partitioned"] and not plain["partitioned"]
        assert ours["rank_pattern"] == plain["rank_pattern"]
        assert set(ours["adapter"]) == set(plain["adapter"]) and len(plain["adapter"]) == 28
        for key, value in plain["adapter"].items():
            torch.testing.assert_close(ours["adapter"][key], value, atol=ATOL, rtol=1e-4, msg=f"rank {rank} {key}")
        for name, value in plain["base"].items():
            torch.testing.assert_close(ours["base"][name], value, atol=ATOL, rtol=1e-4, msg=f"rank {rank} {name}")
        torch.testing.assert_close(ours["losses"], plain["losses"], atol=ATOL, rtol=0, msg=f"rank {rank} losses")
        for key, value in plain["trained"].items():
            torch.testing.assert_close(ours["trained"][key], value, atol=ATOL, rtol=1e-4, msg=f"rank {rank} {key}")
    ours = results[0]["zero"]
    torch.testing.assert_close(results[1]["zero"]["adapter"], ours["adapter"], atol=0, rtol=0)
    q = "model.layers.0.self_attn.q_proj"
    rewritten = not torch.allclose(ours["base"][q], original[f"{q}.weight"], atol=1e-4)
    assert rewritten == (init != "eva")  # CorDA: W - s·B·A, LoftQ: the NF4 round trip; EVA keeps W
    a = ours["adapter"][f"base_model.model.{q}.lora_A.weight"]
    b = ours["adapter"][f"base_model.model.{q}.lora_B.weight"]
    if init == "eva":  # A = principal directions of the inputs (orthonormal rows), B = 0
        torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0]), atol=1e-4, rtol=0)
        assert b.abs().max() == 0
    else:
        assert b.abs().max() > 0
    moved = (results[0]["zero"]["trained"][f"base_model.model.{q}.lora_A.weight"] - a).abs().max()
    assert moved > 1e-3  # training moved the adapter


# --- bad input ---------------------------------------------------------------------------------


def _data_pass_without_gather() -> dict:
    """EVA's and CorDA's data passes on a zero.Init model with nothing to gather its weights,
    and an EVA state dict loaded into a model an engine already manages."""
    config = ds_config(3)
    data = calibration(dist.get_rank())
    out = {}
    base = build_base(3, config)
    try:
        preprocess_corda(base, LoraConfig(**CONFIGS["corda"]), run_model=lambda: [base(**b) for b in data])
    except ConfigError as e:
        out["corda"] = str(e)
    out["corda_untouched"] = not any(hasattr(m, "corda_eigens") for m in base.modules())
    lora = get_lora_model(base, LoraConfig(**CONFIGS["eva"]), seed=SEED)
    try:
        initialize_lora_eva_weights(lora, data, show_progress_bar=False)
    except ConfigError as e:
        out["eva"] = str(e)
    with gathered_forward(lora):
        state = {name: a.clone() for name, a in _eva_state(lora, data).items()}
    initialize(lora, config)
    out["engine_state_equal"] = all(  # the data pass may also run on an engine (its hooks gather)
        torch.equal(a, state[name]) for name, a in _eva_state(lora, data).items()
    ) and len(state) == 14
    try:
        initialize_lora_eva_weights(lora, eva_state_dict=state)
    except ConfigError as e:
        out["eva_after_engine"] = str(e)
    return out


def _eva_state(lora, data) -> dict:
    from dist_lora.init import get_eva_state_dict

    return get_eva_state_dict(lora, data, show_progress_bar=False)


def test_data_pass_on_a_partitioned_model_without_gathering_is_refused():
    """Without gathered_forward (and no engine) the forward would fail deep inside a layer on
    empty weights: refused first, naming the flow. On an engine the data pass runs (its hooks
    gather) and gives gathered_forward's result, but loading it there is refused."""
    for result in run_distributed(_data_pass_without_gather, WORLD):
        for what in ("corda", "eva"):
            message = result.get(what, "")
            assert "ZeRO-3" in message and "gathered_forward" in message and "before deepspeed.initialize" in message, what
        assert result["corda_untouched"]
        assert "deepspeed.initialize was called" in result.get("eva_after_engine", "")
        assert result["engine_state_equal"]


def test_embedding_adapters_are_refused_before_deepspeed_starts():
    """A DeepSpeed checkpoint could not tell an embedding's factors from a linear layer's."""
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match=r"LoRA on embeddings \(model.model.embed_tokens\) is not supported under DeepSpeed"):
        initialize(model, ds_config(2))
