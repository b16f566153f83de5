"""DoRA (use_dora): parity with the real PEFT on a plain HF Llama (both directions, merge and
unmerge), layout invariance of a megatron GPT at TP=1, 2, 4 (SP off and on: loss and gathered
gradients of A, B and the magnitude m), and a consolidated TP=2 DoRA run that PEFT loads with
the megatron logits."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_lora import LoraConfig, LoraModel, get_lora_model  # noqa: E402
from dist_lora.bridges import build_megatron_gpt  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from dist_lora.checkpoint.sharded import save_sharded  # noqa: E402
from dist_lora.parallel.grads import finalize_lora_grads  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config, train_lora  # noqa: E402
from tests.tp_utils import gather_param, gather_tp  # noqa: E402

ids = hf_models.sample_ids()
DORA = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, str]:
    return {kind: hf_models.save_base(hf_models.FACTORIES[kind](), tmp_path_factory.mktemp(kind)) for kind in ("llama", "gpt2")}


@pytest.fixture(params=["llama", "gpt2"])
def base_dir(request, base_dirs) -> str:
    """A plain HF Llama (nn.Linear) and GPT-2 (Conv1D, [in, out] weights, biases)."""
    return base_dirs[request.param]


def _base(base_dir):
    return hf_models.load_base(base_dir).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _perturb_magnitudes(model) -> None:
    """Move m away from its init ||W + ΔW||, so that the magnitude shows in the logits."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))


def test_dist_lora_dora_loads_in_peft(base_dir, tmp_path) -> None:
    ours = get_lora_model(_base(base_dir), LoraConfig(target_modules="all-linear", **DORA), seed=0).eval()
    _perturb_magnitudes(ours)
    ours.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    theirs = peft.PeftModel.from_pretrained(_base(base_dir), str(tmp_path)).eval()
    want = _logits(ours)
    assert (want - _logits(_base(base_dir))).abs().max() > 0.1
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=0)
    theirs_state = peft.utils.get_peft_model_state_dict(theirs)
    assert set(theirs_state) == keys

    # merge / unmerge / merge_and_unload against PEFT's
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
    ours_merged, theirs_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    for (n, a), (m, b) in zip(ours_merged.state_dict().items(), theirs_merged.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_peft_dora_loads_in_dist_lora(base_dir, tmp_path) -> None:
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules="all-linear", **DORA)
    theirs = peft.get_peft_model(_base(base_dir), config).eval()
    _perturb_magnitudes(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = LoraModel.from_pretrained(_base(base_dir), tmp_path).eval()
    want = _logits(theirs)
    assert (want - _logits(_base(base_dir))).abs().max() > 0.1
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_training_gradients_match_peft(base_dir, tmp_path, dropout) -> None:
    """Training gradients of A, B and m equal PEFT's (with dropout: the same masks, drawn in
    the same order from the same seed)."""
    config = LoraConfig(target_modules="all-linear", lora_dropout=dropout, **DORA)
    ours = get_lora_model(_base(base_dir), config, seed=0)
    _perturb_magnitudes(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base(base_dir), str(tmp_path), is_trainable=True)
    grads = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(5)
        model(ids).logits.square().mean().backward()
        grads.append({n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad})
    ours_g = {k.removeprefix("model."): v for k, v in grads[0].items()}
    theirs_g = {k.removeprefix("base_model.model."): v for k, v in grads[1].items()}
    assert set(ours_g) == set(theirs_g) and any("magnitude" in k for k in ours_g)
    for key, grad in ours_g.items():
        torch.testing.assert_close(grad, theirs_g[key], atol=1e-6, rtol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------
# megatron: layout invariance

MODEL = dict(num_attention_heads=8, num_query_groups=4)


def _train_gpt(sp: bool) -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL)), LoraConfig(**DORA), seed=0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in params)
    tokens, labels = random_batch(0)
    loss = gpt_loss(model, tokens, labels)
    loss.backward()
    finalize_lora_grads(model)
    grads = {}
    for n, p in params.items():
        grad = p.grad.detach()
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(p, attr):
                setattr(grad, attr, getattr(p, attr))
        grads[n] = gather_param(grad)
    return {"loss": loss.item(), "grads": grads}


@pytest.fixture(scope="module")
def gpt_reference() -> dict:
    return run_distributed(_train_gpt, 1, tp=1, args=(False,))[0]


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_dora_layout_invariance(gpt_reference, tp, sp) -> None:
    results = run_distributed(_train_gpt, tp, tp=tp, args=(sp,))
    for got in results:
        assert got["loss"] == pytest.approx(gpt_reference["loss"], rel=1e-5)
        assert set(got["grads"]) == set(gpt_reference["grads"])
        for name, want in gpt_reference["grads"].items():
            g = got["grads"][name]
            rel = (g - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
            assert rel < 1e-5, (name, rel)


# ---------------------------------------------------------------------------------------------
# consolidation of a TP=2 DoRA run of a bridge-built Llama

VOCAB, BATCH, SEQ = 128, 2, 16


def _bridge_ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _train_bridge(hf_dir: str, ckpt_dir: str) -> torch.Tensor:
    model = get_lora_model(build_megatron_gpt(hf_dir, tp=2), LoraConfig(**DORA), seed=0)
    train_lora(model, steps=2)
    model.eval()
    with torch.no_grad():
        logits = gather_tp(model(_bridge_ids(), None, None), dim=-1)
        weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        model.merge_adapter()  # on shards: the row-parallel norm is all-reduced over TP
        merged = gather_tp(model(_bridge_ids(), None, None), dim=-1)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0, msg=n)
    torch.testing.assert_close(merged, logits, atol=1e-4, rtol=0)
    save_sharded(model, ckpt_dir)
    return logits


def test_consolidated_dora_loads_in_peft(tmp_path) -> None:
    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    LlamaForCausalLM(LlamaConfig(**MEGATRON_LLAMA, tie_word_embeddings=False)).save_pretrained(hf_dir)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "adapter")
    logits = run_distributed(_train_bridge, 2, tp=2, args=(hf_dir, ckpt))
    assert torch.equal(logits[0], logits[1])
    consolidate(ckpt, out, hf_model_dir=hf_dir, show_progress=False)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(_bridge_ids()).logits
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = theirs(_bridge_ids()).logits
    assert (logits[0] - base_logits).abs().max() > 0.1
    torch.testing.assert_close(got, logits[0], atol=1e-4, rtol=0)
    used = peft.utils.get_peft_model_state_dict(theirs)
    assert sum("lora_magnitude_vector" in k for k in used) == 7 * MEGATRON_LLAMA["num_hidden_layers"]


def test_inference_mode_freezes_the_magnitude_and_weighting_refuses_dora(base_dirs) -> None:
    model = get_lora_model(_base(base_dirs["llama"]), LoraConfig(inference_mode=True, **DORA), seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    model = get_lora_model(_base(base_dirs["llama"]), LoraConfig(**DORA), seed=0)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    with pytest.raises(NotImplementedError, match="DoRA"):
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="linear")


def _save_or_load(directory: str, save: bool) -> dict:
    from dist_lora.checkpoint.sharded import load_sharded

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, False, **MODEL)), LoraConfig(**DORA), seed=0 if save else 1)
    if save:
        _perturb_magnitudes(model)
        save_sharded(model, directory)
    else:
        load_sharded(model, directory)
    return {n: gather_param(p) for n, p in model.named_parameters() if p.requires_grad}


def test_sharded_checkpoint_reshards_dora(tmp_path) -> None:
    """Saved at TP=2, loaded at TP=4: m of column layers is a row shard, of row layers replicated."""
    saved = run_distributed(_save_or_load, 2, tp=2, args=(str(tmp_path / "ckpt"), True))[0]
    loaded = run_distributed(_save_or_load, 4, tp=4, args=(str(tmp_path / "ckpt"), False))[0]
    assert set(saved) == set(loaded) and any("lora_magnitude_vector" in n for n in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_merging_two_dora_adapters_matches_peft(base_dirs, tmp_path) -> None:
    base_dir = base_dirs["llama"]
    for i, name in enumerate(("a", "b")):
        model = get_lora_model(_base(base_dir), LoraConfig(target_modules=["q_proj", "down_proj"], **DORA), seed=i)
        _perturb_magnitudes(model)
        model.save_pretrained(tmp_path / name)
    ours = LoraModel.from_pretrained(_base(base_dir), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    theirs = peft.PeftModel.from_pretrained(_base(base_dir), str(tmp_path / "a"))
    theirs.load_adapter(str(tmp_path / "b"), "b")
    ours.merge_adapter(["default", "b"])
    theirs.base_model.merge_adapter(["default", "b"])
    for layer in ("q_proj", "down_proj"):
        got = _base_weight(ours, layer)
        torch.testing.assert_close(got, _base_weight(theirs, layer), atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    for layer in ("q_proj", "down_proj"):
        torch.testing.assert_close(_base_weight(ours, layer), _base_weight(_base(base_dir), layer), atol=1e-6, rtol=0)


def _base_weight(model, layer: str) -> torch.Tensor:
    """Layer 1's ``layer`` base weight, LoRA-wrapped or not (dist_lora, PEFT, plain HF)."""
    module = next(m for n, m in model.named_modules() if n.endswith(f"layers.1.self_attn.{layer}") or n.endswith(f"layers.1.mlp.{layer}"))
    return getattr(module, "base_layer", module).weight.detach().clone()
