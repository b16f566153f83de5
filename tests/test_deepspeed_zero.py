"""dist_lora on Hugging Face models under real DeepSpeed ZeRO 1/2/3 (2 CPU ranks, gloo).

Every run uses the shipped configs/zero{1,2,3}_cpu.json (torch AdamW, explicit clipping), so
the configs are proven by the tests. The reference is plain data parallelism: the same tiny
Llama, the same adapters (same seed), gradients averaged with
:func:`allreduce_data_parallel_grads`, the same clipping and the same torch AdamW. The zero3
config sets ``stage3_param_persistence_threshold: 0`` so even the tiny LoRA factors are
partitioned (the tests check they are), as a large model's are.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dist_lora.deepspeed import prepare_deepspeed  # noqa: E402

prepare_deepspeed()  # before DeepSpeed's first use; forked ranks inherit the patched module
import deepspeed  # noqa: E402

from dist_lora import LoraConfig, LoraModel, get_lora_model  # noqa: E402
from dist_lora.checkpoint.peft_format import adapter_state_dict  # noqa: E402
from dist_lora.config import ConfigError  # noqa: E402
from dist_lora.deepspeed import check_ds_config, initialize, load_ds_config  # noqa: E402
from dist_lora.parallel import zero  # noqa: E402
from dist_lora.layers import LoraLinear  # noqa: E402
from dist_lora.parallel.grads import allreduce_data_parallel_grads  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
WORLD = 2
STEPS = 3
SEED = 0
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
ATOL = 1e-5


def ds_config(stage: int, device: str = "cpu") -> dict:
    return load_ds_config(os.path.join(CONFIGS, f"zero{stage}_{device}.json"))


def batch(rank: int, step: int) -> torch.Tensor:
    return hf_models.sample_ids(batch=1, seq=8, seed=100 * step + rank)


def build_base(stage: int, config: dict, under_init: bool = True) -> torch.nn.Module:
    """The tiny Llama; for stage 3 built under ``zero.Init`` (partitioned as it is created) and
    given the reference weights through GatheredParameters (rank 0's copy is kept)."""
    reference = hf_models.tiny_llama()
    if stage != 3 or not under_init:
        return reference
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = type(reference)(reference.config)
    for (name, param), (ref_name, ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(ref.data)
    model.eval()
    return model


def full_adapter(lora) -> dict[str, torch.Tensor]:
    return zero.full_tensors(adapter_state_dict(lora, "default", keep_vars=True))


# --- rank functions -----------------------------------------------------------------------------


def _train_reference(lora_kwargs: dict) -> dict:
    """Plain data parallelism: all-reduced (averaged) gradients, clipping, torch AdamW."""
    config = ds_config(1)
    lora = get_lora_model(hf_models.tiny_llama(), LoraConfig(**lora_kwargs), seed=SEED)
    params = [p for p in lora.parameters() if p.requires_grad]
    hyper = {k: v for k, v in config["optimizer"]["params"].items() if k != "torch_adam"}
    optimizer = torch.optim.AdamW(params, **hyper)
    losses, norms = [], []
    for step in range(STEPS):
        ids = batch(dist.get_rank(), step)
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        allreduce_data_parallel_grads(lora, dist.group.WORLD)
        norms.append(torch.nn.utils.clip_grad_norm_(params, config["gradient_clipping"]).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "adapter": full_adapter(lora), "norms": norms}


def engine_losses(engine, steps: int = STEPS) -> list[float]:
    """Train ``engine`` for ``steps`` steps on this rank's batches; the per-step losses."""
    losses = []
    for step in range(steps):
        ids = batch(dist.get_rank(), step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _train_zero(stage: int, under_init: bool, lora_kwargs: dict, directory: str) -> dict:
    config = ds_config(stage)
    lora = get_lora_model(build_base(stage, config, under_init), LoraConfig(**lora_kwargs), seed=SEED)
    engine, *_ = initialize(lora, config)
    losses = engine_losses(engine)
    partitioned = [p.data.numel() == 0 for p in lora.parameters() if p.requires_grad]
    lora.save_pretrained(directory)  # every rank calls it
    return {"losses": losses, "adapter": full_adapter(lora), "partitioned": partitioned}


def _zero_vs_reference(stage: int, under_init: bool, lora_kwargs: dict, directory: str) -> dict:
    return {"reference": _train_reference(lora_kwargs), "zero": _train_zero(stage, under_init, lora_kwargs, directory)}


def _inject_zero3(config_kwargs: dict) -> dict:
    """Inject into a zero.Init model; return sizes, adapters and (gathered) base weights."""
    config = ds_config(3)
    base = build_base(3, config)
    q_proj = base.model.layers[0].self_attn.q_proj.weight
    assert q_proj.data.numel() == 0 and tuple(q_proj.ds_shape) == (32, 32)  # really partitioned
    lora = get_lora_model(base, LoraConfig(**config_kwargs), seed=SEED)
    layers = {name: layer for name, layer in lora.lora_layers()}
    bases = {name: layer.base_layer.weight for name, layer in layers.items()}
    return {
        "sizes": {name: (layer.in_features, layer.out_features) for name, layer in layers.items()},
        "still_partitioned": all(w.data.numel() == 0 for w in bases.values()),
        "adapter": full_adapter(lora),
        "base": zero.full_tensors(bases),
    }


def _zero3_train_save_merge(directory: str) -> dict:
    """ZeRO-3 training with every rank calling save_pretrained during (after step 1) and after
    training; then merge_and_unload. Returns what the parent checks."""
    config = ds_config(3)
    lora = get_lora_model(build_base(3, config), LoraConfig(**LORA), seed=SEED)
    engine, *_ = initialize(lora, config)
    out = {}
    for step in range(STEPS):
        ids = batch(dist.get_rank(), step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if step == 0:
            trainable = [p for p in lora.parameters() if p.requires_grad]
            out["partitioned_at_save"] = all(p.data.numel() == 0 for p in trainable)
            lora.save_pretrained(os.path.join(directory, "during"))
            out["during"] = full_adapter(lora)
    lora.save_pretrained(os.path.join(directory, "after"))
    out["after"] = full_adapter(lora)
    engine.eval()
    with torch.no_grad():
        out["logits"] = engine(input_ids=hf_models.sample_ids()).logits
    merged = lora.merge_and_unload(safe_merge=True)  # the finiteness check gathers too
    weights = dict(merged.named_parameters())
    projections = [p for n, p in weights.items() if n.endswith("_proj.weight")]  # the merged ones
    out["merged_partitioned"] = len(projections) == 14 and all(p.data.numel() == 0 for p in projections)
    out["merged"] = zero.full_tensors(weights)
    # resume: the saved adapter loaded into a fresh zero.Init model, then a new engine
    resumed = LoraModel.from_pretrained(build_base(3, config), os.path.join(directory, "after"), is_trainable=True)
    engine, *_ = initialize(resumed, config)
    engine.eval()
    with torch.no_grad():
        out["resumed_logits"] = engine(input_ids=hf_models.sample_ids()).logits
    return out


# --- training equals data parallelism --------------------------------------------------------------


DORA = dict(LORA, use_dora=True)


@pytest.mark.parametrize(
    "stage, under_init, lora_kwargs",
    [(1, True, LORA), (2, True, LORA), (3, True, LORA), (3, False, LORA), (3, True, DORA)],
    ids=["zero1", "zero2", "zero3", "zero3-no-init", "zero3-dora"],
)
def test_zero_training_equals_data_parallel(tmp_path, stage, under_init, lora_kwargs):
    """Losses per rank and step, and the (gathered) adapters after 3 steps, match plain DP
    (gradient clipping is active: the norms here exceed 1); save_pretrained on every rank writes
    them. ``zero3-no-init``: a model built outside zero.Init is partitioned by
    deepspeed.initialize; ``zero3-dora``: DoRA's forward reads the (gathered) base weight."""
    results = run_distributed(_zero_vs_reference, WORLD, args=(stage, under_init, lora_kwargs, str(tmp_path)))
    initial = _reference_injection(lora_kwargs)["adapter"]
    for rank, result in enumerate(results):
        ref, ours = result["reference"], result["zero"]
        assert max(ref["norms"]) > 1.0  # so clipping acts, and must act alike
        torch.testing.assert_close(ours["losses"], ref["losses"], atol=ATOL, rtol=0, msg=f"rank {rank} losses")
        moved = [(ours["adapter"][k] - v).abs().max().item() for k, v in initial.items()]
        assert min(moved) > 1e-3  # every factor trained (3 AdamW steps of lr 0.01)
        assert set(ours["adapter"]) == set(ref["adapter"])
        assert len(ref["adapter"]) == (42 if lora_kwargs.get("use_dora") else 28)
        for key, value in ref["adapter"].items():
            torch.testing.assert_close(ours["adapter"][key], value, atol=ATOL, rtol=1e-4, msg=key)
        # stage 3 partitions the adapters too (else saving/merging would be trivially right)
        assert all(ours["partitioned"]) == (stage == 3)
    torch.testing.assert_close(results[0]["zero"]["adapter"], results[1]["zero"]["adapter"], atol=0, rtol=0)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(saved, results[0]["zero"]["adapter"], atol=0, rtol=0)


# --- injection under zero.Init ---------------------------------------------------------------------


def _reference_injection(config_kwargs: dict) -> dict:
    lora = get_lora_model(hf_models.tiny_llama(), LoraConfig(**config_kwargs), seed=SEED)
    layers = dict(lora.lora_layers())
    return {
        "sizes": {name: (layer.in_features, layer.out_features) for name, layer in layers.items()},
        "adapter": {k: v.clone() for k, v in lora.adapter_state_dict().items()},
        "base": {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()},
    }


INITS = {
    "default": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "random_b": LORA,
    "pissa": dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa"),
    "olora": dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora"),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False),
}


@pytest.mark.parametrize("init", list(INITS))
def test_zero3_injection_matches_unpartitioned(init):
    """On a zero.Init model: sizes from ds_shape, adapters (A, B, DoRA's m) identical to the
    model without ZeRO; PiSSA/OLoRA's rewritten base weight identical and re-partitioned."""
    expected = _reference_injection(INITS[init])
    results = run_distributed(_inject_zero3, WORLD, args=(INITS[init],))
    for result in results:
        assert result["sizes"] == expected["sizes"] and len(result["sizes"]) == 14
        assert result["still_partitioned"]
        assert set(result["adapter"]) == set(expected["adapter"])
        for key, value in expected["adapter"].items():
            torch.testing.assert_close(result["adapter"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        for name, weight in expected["base"].items():
            torch.testing.assert_close(result["base"][name], weight, atol=1e-6, rtol=1e-5, msg=name)
    if init in ("pissa", "olora"):  # the residual really replaced W
        original = dict(hf_models.tiny_llama().named_parameters())
        q = "model.layers.0.self_attn.q_proj"
        assert not torch.allclose(results[0]["base"][q], original[f"{q}.weight"], atol=1e-3)
    if init == "dora":
        assert any(".lora_magnitude_vector" in k for k in results[0]["adapter"])


def _from_pretrained_zero3(model_dir: str) -> dict:
    """transformers' own ZeRO-3 path: with an HfDeepSpeedConfig alive, from_pretrained builds
    the model under zero.Init and loads the checkpoint into the partitions."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = ds_config(3)
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    partitioned = all(p.data.numel() == 0 for p in model.parameters())
    weights = zero.full_tensors(dict(model.named_parameters()))
    lora = get_lora_model(model, LoraConfig(**LORA), seed=SEED)
    engine, *_ = initialize(lora, config)
    ids = batch(dist.get_rank(), 0)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    try:  # too late: the engine would not see a new adapter
        lora.add_adapter("late", LoraConfig(**LORA))
        late = "added"
    except ConfigError as e:
        late = str(e)
    late_intact = "late" not in lora.peft_config and all("late" not in n for n, _ in lora.named_parameters())
    return {"partitioned": partitioned, "weights": weights, "loss": loss.item(), "adapter": full_adapter(lora),
            "late": late, "late_intact": late_intact}


def test_hf_from_pretrained_under_zero3_then_inject(tmp_path):
    """The user's path: AutoModelForCausalLM.from_pretrained under HfDeepSpeedConfig (ZeRO-3),
    then get_lora_model and initialize: checkpoint weights in the partitions, the first loss
    of the unpartitioned model, the adapters trained. An adapter added after initialize is
    refused (with what to do), leaving the model as it was."""
    reference = hf_models.tiny_llama()
    model_dir = hf_models.save_base(reference, tmp_path / "base")
    results = run_distributed(_from_pretrained_zero3, WORLD, args=(model_dir,))
    weights = {k: v.detach().clone() for k, v in reference.named_parameters()}
    lora = get_lora_model(reference, LoraConfig(**LORA), seed=SEED)
    initial = {k: v.clone() for k, v in lora.adapter_state_dict().items()}
    for rank, result in enumerate(results):
        assert result["partitioned"]
        torch.testing.assert_close(result["weights"], weights, atol=0, rtol=0)
        ids = batch(rank, 0)
        with torch.no_grad():
            expected = lora(input_ids=ids, labels=ids).loss.item()
        assert abs(result["loss"] - expected) < ATOL
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert (result["adapter"][key] - initial[key]).abs().max() > 1e-3
        assert "deepspeed.initialize was called" in result["late"] and "Add adapters first" in result["late"]
        assert result["late_intact"]


def _trainer_zero3(directory: str) -> dict:
    """transformers' Trainer with its DeepSpeed integration (our zero3 config, 'auto' where the
    Trainer fills in batch size and lr), then save_pretrained on every rank."""
    from transformers import Trainer, TrainingArguments

    # accelerate raises torch's thread count when OMP_NUM_THREADS is unset; more than one OpenMP
    # thread in a rank forked from a parent that has used OpenMP hangs in the first matmul.
    os.environ["OMP_NUM_THREADS"] = "1"
    config = ds_config(3)
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    config["optimizer"]["params"]["lr"] = "auto"
    args = TrainingArguments(
        output_dir=os.path.join(directory, "trainer"), deepspeed=config, per_device_train_batch_size=1,
        max_steps=STEPS, learning_rate=0.01, lr_scheduler_type="constant", max_grad_norm=1.0, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False,  # LoraModel.forward(*args, **kwargs) hides the model's signature
    )
    lora = get_lora_model(hf_models.tiny_llama(), LoraConfig(**LORA), seed=SEED)
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in (batch(r, s) for s in range(STEPS) for r in range(WORLD))]
    trainer = Trainer(model=lora, args=args, train_dataset=data)
    loss = trainer.train().training_loss
    lora.save_pretrained(os.path.join(directory, "adapter"))
    engine = trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=hf_models.sample_ids()).logits
    return {"engine": type(engine).__name__, "loss": loss, "logits": logits, "adapter": full_adapter(lora)}


def test_hf_trainer_with_zero3(tmp_path):
    """Trainer(deepspeed=zero3 config) trains a LoraModel; save_pretrained on every rank gives
    the full adapter, and PEFT's load of it reproduces the engine's logits."""
    results = run_distributed(_trainer_zero3, WORLD, args=(str(tmp_path),))
    assert results[0]["engine"] == "DeepSpeedEngine"
    initial = _reference_injection(LORA)["adapter"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, value in initial.items():
        assert saved[key].shape == value.shape and torch.equal(saved[key], results[0]["adapter"][key])
        assert (saved[key] - value).abs().max() > 1e-3, key  # trained
    theirs = peft.PeftModel.from_pretrained(hf_models.tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(hf_models.logits(theirs, hf_models.sample_ids()), results[0]["logits"], atol=ATOL, rtol=0)


# --- saving and merging under ZeRO-3 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero3_save")
    results = run_distributed(_zero3_train_save_merge, WORLD, args=(str(directory),))
    return directory, results


def test_zero3_save_pretrained_is_never_empty(zero3_run):
    """All ranks call save_pretrained while the adapters are partitioned; the file holds every
    tensor in full, equal to the gathered parameter, during and after training."""
    directory, results = zero3_run
    assert results[0]["partitioned_at_save"] and results[1]["partitioned_at_save"]
    shapes = {k: tuple(v.shape) for k, v in _reference_injection(LORA)["adapter"].items()}
    for when in ("during", "after"):
        assert sorted(os.listdir(directory / when)) == ["adapter_config.json", "adapter_model.safetensors"]
        saved = load_file(directory / when / "adapter_model.safetensors")
        assert {k: tuple(v.shape) for k, v in saved.items()} == shapes
        for key, value in saved.items():
            assert value.numel() > 0 and torch.equal(value, results[0][when][key]), key
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(load_file(directory / "during" / "adapter_model.safetensors")[key], results[0]["after"][key])


def test_zero3_saved_adapter_loads_in_peft(zero3_run):
    """The file from the ZeRO-3 run, loaded by the real PEFT onto the HF model, gives the
    logits the DeepSpeed engine computed."""
    directory, results = zero3_run
    base = hf_models.tiny_llama()
    base_logits = hf_models.logits(base, hf_models.sample_ids())
    theirs = peft.PeftModel.from_pretrained(base, str(directory / "after"))
    theirs.eval()
    logits = hf_models.logits(theirs, hf_models.sample_ids())
    torch.testing.assert_close(logits, results[0]["logits"], atol=ATOL, rtol=0)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter was not ignored


def test_zero3_merge_and_unload(zero3_run):
    """merge_and_unload on the trained ZeRO-3 model: the merged weights come back partitioned;
    gathered, they are W + s·B·A and give the logits of the unmerged engine."""
    directory, results = zero3_run
    merged = results[0]["merged"]
    assert results[0]["merged_partitioned"] and results[1]["merged_partitioned"]
    torch.testing.assert_close(results[1]["merged"], merged, atol=0, rtol=0)
    model = hf_models.tiny_llama()
    assert set(merged) == set(dict(model.named_parameters()))  # no LoRA module left
    adapter = results[0]["after"]
    name = "model.layers.1.mlp.down_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    expected = dict(model.named_parameters())[f"{name}.weight"] + (LORA["lora_alpha"] / LORA["r"]) * b @ a
    torch.testing.assert_close(merged[f"{name}.weight"], expected, atol=1e-6, rtol=1e-5)
    model.load_state_dict(merged)
    torch.testing.assert_close(hf_models.logits(model, hf_models.sample_ids()), results[0]["logits"], atol=ATOL, rtol=0)


def test_zero3_adapter_resumes_into_a_zero_init_model(zero3_run):
    """LoraModel.from_pretrained(is_trainable=True) on a fresh zero.Init model, then
    initialize: the engine computes the trained model's logits."""
    _, results = zero3_run
    for result in results:
        torch.testing.assert_close(result["resumed_logits"], results[0]["logits"], atol=ATOL, rtol=0)


# --- configs and bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_configs_need_no_compiled_op_and_set_clipping(stage):
    config = ds_config(stage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_ds_config(config, allow_jit=False) is config
    assert config["gradient_clipping"] == 1.0 and config["zero_optimization"]["stage"] == stage
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["optimizer"] == ds_config(1)["optimizer"]  # the reference run uses this one


def test_offload_config_without_cpu_adam_is_refused_before_deepspeed():
    """offload_optimizer needs DeepSpeedCPUAdam, a JIT-compiled op here: refused with what to
    change, before deepspeed.initialize starts a compile (no process group is needed)."""
    from deepspeed.git_version_info import installed_ops

    assert not installed_ops["cpu_adam"]  # this install has no prebuilt op (else nothing to refuse)
    config = ds_config(3)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(ConfigError, match=r"offload_optimizer.device='cpu'.*DS_BUILD_CPU_ADAM=1"):
        check_ds_config(config, allow_jit=False)
    lora = get_lora_model(hf_models.tiny_llama(), LoraConfig(**LORA), seed=SEED)
    with pytest.raises(ConfigError, match="offload_optimizer"):
        initialize(lora, config, allow_jit=False)
    assert not dist.is_initialized()


def test_gpu_configs_are_refused_on_a_machine_without_fused_adam():
    for stage in (1, 2, 3):
        config = ds_config(stage, "gpu")
        assert config["bf16"]["enabled"] and "torch_adam" not in config["optimizer"]["params"]
        with pytest.raises(ConfigError, match="fused_adam"):
            check_ds_config(config, allow_jit=False)
        check_ds_config(config, allow_jit=True)  # where compiling is fine (GPU machines)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_configs_parse_in_deepspeed(stage, device):
    """DeepSpeed's own parser reads the shipped files (comment keys included) as intended."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(os.path.join(CONFIGS, f"zero{stage}_{device}.json"))
    assert parsed.zero_optimization_stage == stage and parsed.gradient_clipping == 1.0
    assert parsed.bfloat16_config.enabled == (device == "gpu")


def test_missing_gradient_clipping_warns():
    config = ds_config(1)
    del config["gradient_clipping"]
    with pytest.warns(UserWarning, match="clips the gradient norm to 1.0"):
        check_ds_config(config)


def test_lora_linear_is_a_zero3_leaf():
    """DeepSpeed fetches a leaf module's whole subtree before its forward: the base weight and
    factors LoraLinear reads directly."""
    lora = get_lora_model(hf_models.tiny_llama(), LoraConfig(**LORA), seed=SEED)
    layers = [m for m in lora.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 and all(deepspeed.utils.z3_leaf_module(m) for m in layers)


# --- the launcher ------------------------------------------------------------------------------------

LAUNCHER = os.path.join(os.path.dirname(CONFIGS), "launch", "deepspeed.sh")


def test_launcher_help_explains_its_settings():
    import subprocess

    out = subprocess.run(["bash", LAUNCHER, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for word in ("DS_CONFIG", "HOSTFILE", "NUM_GPUS", "MASTER_ADDR", "NO_SSH", "NODE_RANK", "hostfile.example"):
        assert word in out.stdout, word
    assert not out.stdout.startswith("#")


@pytest.mark.slow
def test_launcher_trains_and_saves_a_peft_adapter(tmp_path):
    """launch/deepspeed.sh with 2 CPU processes (ZeRO-3, the built-in tiny model): the adapter
    it writes is full and changes the model's output when the real PEFT loads it."""
    import subprocess

    from transformers import AutoModelForCausalLM

    from dist_lora.tiny_model import builtin_model_dir

    import socket

    with socket.socket() as probe:  # a port the OS says is free now
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, NUM_GPUS="2", MASTER_PORT=port, DIST_LORA_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        ["bash", LAUNCHER, "--output", str(tmp_path / "out"), "--steps", "2", "--r", "4"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2 loss" in out.stdout
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert len(saved) == 28 and all(v.numel() > 0 for v in saved.values())
    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir(str(tmp_path / "cache")), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
        after = theirs(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
