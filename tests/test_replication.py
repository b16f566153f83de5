"""layer_replication: a deeper stack from the same weights, each replica with its own adapters.

HF Llama / Qwen2 / GPT-2: the replicated model computes the dense expanded model's function
(layer k runs original layer source[k]), layer_idx / num_hidden_layers / layer_types follow the
expanded stack, generation with a KV cache matches generation without one, the replicas hold
the very same Parameter objects (no storage added; peak RSS measured in a fresh process), and
the real PEFT loads our saved adapter with identical logits. megatron GPTModel: TP=2 with SP
on and off gives the TP=1 logits; sharded save / resume / consolidation use expanded indices
and the consolidated adapter loads into the real PEFT with the megatron logits. Merging is
refused; materialize copies the shared weights on purpose and then merges. Bad ranges fail
with errors that name them, leaving the model as it was.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.tuners_utils import replicate_layers as peft_replicate_layers  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_lora import ConfigError, LoraConfig, LoraModel, get_lora_model  # noqa: E402
from dist_lora.merge import MergeError  # noqa: E402
from dist_lora.replication import expand_ranges, find_layer_stack, share_clone  # noqa: E402
from tests import hf_models  # noqa: E402

RANGES = [[0, 2], [1, 3]]  # 3 layers -> positions [0, 1, 1, 2]
SOURCE = [0, 1, 1, 2]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf(kind: str):
    layers = {"n_layer": 3} if kind == "gpt2" else {"num_hidden_layers": 3}
    return hf_models.FACTORIES[kind](**layers)


def _lora(**extra) -> LoraConfig:
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "init_lora_weights": False,
                         "layer_replication": RANGES, **extra})


def _base_params(layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """A layer's base parameters by their name without LoRA wrapping (``base_layer.``)."""
    return {n.replace("base_layer.", ""): p for n, p in layer.named_parameters() if "lora_" not in n}


def _dense_reference(kind: str, base) -> torch.nn.Module:
    """An ordinary HF model of len(SOURCE) layers with layer k's weights copied from layer SOURCE[k]."""
    layers = {"n_layer": len(SOURCE)} if kind == "gpt2" else {"num_hidden_layers": len(SOURCE)}
    dense = hf_models.FACTORIES[kind](**layers)
    stack, _ = find_layer_stack(base)
    state = {}
    for key, value in base.state_dict().items():
        m = re.fullmatch(rf"{re.escape(stack)}\.(\d+)\.(.+)", key)
        if m is None:
            state[key] = value
        else:
            for k, src in enumerate(SOURCE):
                if src == int(m[1]):
                    state[f"{stack}.{k}.{m[2]}"] = value.clone()
    dense.load_state_dict(state)
    return dense.eval()


def _generate(model, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# Index math, structure and sharing


def test_expand_ranges() -> None:
    assert expand_ranges([[0, 4], [2, 5]], 5) == [0, 1, 2, 3, 2, 3, 4]  # the mergekit example
    assert expand_ranges([[1, 2]], 3) == [1]  # shrinking is allowed
    assert expand_ranges(RANGES, 3) == SOURCE


def test_share_clone_allocates_nothing() -> None:
    layer = hf_models.tiny_llama().model.layers[0]
    clone = share_clone(layer)
    assert clone is not layer and clone.self_attn is not layer.self_attn
    assert clone.self_attn._parameters is not layer.self_attn._parameters
    for (name, p), (name2, q) in zip(layer.named_parameters(), clone.named_parameters()):
        assert name == name2 and p is q
    clone.self_attn.layer_idx = 7
    assert layer.self_attn.layer_idx == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_hf_replicated_model(kind: str) -> None:
    base = _hf(kind)
    dense = _dense_reference(kind, base)
    n_storages = len({p.data_ptr() for p in base.parameters()})
    ids = hf_models.sample_ids()
    model = get_lora_model(base, _lora(), seed=0)

    name, stack = find_layer_stack(base)
    assert len(stack) == 4 and base.config.num_hidden_layers == 4
    attn = [layer.attn if kind == "gpt2" else layer.self_attn for layer in stack]
    assert [a.layer_idx for a in attn] == [0, 1, 2, 3]
    if kind == "qwen2":
        assert base.config.layer_types == ["full_attention"] * 4

    # Base weights shared, never copied: position 2 holds position 1's Parameter objects.
    shared, own = _base_params(stack[1]), _base_params(stack[2])
    assert shared.keys() == own.keys() and all(own[n] is shared[n] for n in shared)
    assert all(own[n].data_ptr() == shared[n].data_ptr() for n in shared)
    assert len({p.data_ptr() for n, p in base.named_parameters() if "lora_" not in n}) == n_storages
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    # ... adapters separate: every position has its own, with its own (seeded) values.
    lora = dict(model.lora_layers())
    assert {int(re.search(r"\.(\d+)\.", n)[1]) for n in lora} == {0, 1, 2, 3}
    first = [p for n, p in stack[1].named_parameters() if "lora_" in n]
    second = [p for n, p in stack[2].named_parameters() if "lora_" in n]
    assert len(first) == len(second) > 0
    assert all(a is not b and not torch.equal(a, b) for a, b in zip(first, second))

    # The function: the dense expanded model's (adapters off), changed by the adapters (on).
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (lora_logits - dense(input_ids=ids).logits).abs().max() > 1e-2
    # Generation: the KV cache has one slot per position.
    torch.testing.assert_close(_generate(model, ids, True), _generate(model, ids, False), atol=0, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_generate(model, ids, True), _generate(dense, ids, True), atol=0, rtol=0)


def test_peak_memory_of_replication(tmp_path) -> None:
    """Fresh process, ~205 MB Llama (4 layers of 51 MB), VmHWM reset via /proc/self/clear_refs:
    replicating to 8 layers may add only small per-layer state; with LoRA, only the adapters."""
    script = tmp_path / "probe.py"
    script.write_text(_MEMORY_PROBE)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    layer = m["layer_bytes"]
    assert layer > 50e6
    assert m["replicate_peak"] < 0.02 * layer, m  # no layer copy, not even for a moment
    assert m["lora_peak"] < m["adapter_bytes"] + 0.05 * layer, m


_MEMORY_PROBE = r'''
import gc, json, re
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from dist_lora import LoraConfig, get_lora_model
from dist_lora.replication import replicate_layers

def rss():
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text)[1]) * 1024 for k in ("VmRSS", "VmHWM")}

def measure(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = rss()["VmRSS"]
    result = fn()
    return rss()["VmHWM"] - before, result

def llama(hidden, ffn, layers, vocab=128):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # touch every page
    return model

lora = lambda: LoraConfig(r=8, target_modules="all-linear", layer_replication=[[0, 4], [0, 4]])
get_lora_model(llama(16, 32, 4), lora(), seed=0)  # warm up torch's one-time allocations
model = llama(1024, 2816, 4)
layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
replicate_peak, record = measure(lambda: replicate_layers(model, [[0, 4], [0, 4]]))
assert len(model.model.layers) == 8
record.restore(model)
del record
lora_peak, lora_model = measure(lambda: get_lora_model(model, lora(), seed=0))
adapter_bytes = sum(p.numel() * p.element_size() for n, p in lora_model.named_parameters() if "lora_" in n)
print(json.dumps(dict(layer_bytes=layer_bytes, replicate_peak=replicate_peak, lora_peak=lora_peak,
                      adapter_bytes=adapter_bytes)))
'''


# ---------------------------------------------------------------------------------------------
# Parity with the real PEFT


def _save_ours(kind: str, tmp_path) -> tuple[str, str, torch.Tensor]:
    base_dir = hf_models.save_base(_hf(kind), tmp_path / "base")
    model = get_lora_model(hf_models.load_base(base_dir), _lora(), seed=0)
    logits = hf_models.logits(model, hf_models.sample_ids())
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["layer_replication"] == RANGES
    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(".layers.3." in k or ".h.3." in k for k in keys)  # expanded indices
    return base_dir, out, logits


def _check_peft_used_every_key(peft_model, adapter_dir: str) -> None:
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    used = get_peft_model_state_dict(peft_model)
    assert set(used) == set(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(used[key], tensor, atol=0, rtol=0)


def test_peft_loads_replicated_llama_adapter(tmp_path) -> None:
    base_dir, out, ours = _save_ours("llama", tmp_path)
    peft_model = PeftModel.from_pretrained(hf_models.load_base(base_dir), out).eval()
    assert peft_model.base_model.model.config.num_hidden_layers == 4
    torch.testing.assert_close(hf_models.logits(peft_model, hf_models.sample_ids()), ours, atol=1e-5, rtol=0)
    _check_peft_used_every_key(peft_model, out)
    # ... and dist_lora's own loader rebuilds the same model from the files.
    again = LoraModel.from_pretrained(hf_models.load_base(base_dir), out)
    torch.testing.assert_close(hf_models.logits(again, hf_models.sample_ids()), ours, atol=1e-5, rtol=0)


def test_peft_loads_replicated_gpt2_adapter(tmp_path) -> None:
    """PEFT 0.21.2 cannot replicate GPT2LMHeadModel itself (it looks for ``.model.layers`` or a
    top-level ``.h``; GPT-2 has ``.transformer.h``). So PEFT's own ``replicate_layers`` expands
    the inner GPT2Model and PEFT loads the adapter (layer_replication removed) onto that."""
    base_dir, out, ours = _save_ours("gpt2", tmp_path)
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):
        PeftModel.from_pretrained(hf_models.load_base(base_dir), out)
    fresh = hf_models.load_base(base_dir)
    peft_replicate_layers(fresh.transformer, RANGES)
    plain = str(tmp_path / "adapter_without_replication")
    shutil.copytree(out, plain)
    with open(os.path.join(plain, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(plain, "adapter_config.json"), "w") as f:
        json.dump({**config, "layer_replication": None}, f)
    peft_model = PeftModel.from_pretrained(fresh, plain).eval()
    torch.testing.assert_close(hf_models.logits(peft_model, hf_models.sample_ids()), ours, atol=1e-5, rtol=0)
    _check_peft_used_every_key(peft_model, plain)


# ---------------------------------------------------------------------------------------------
# Merge and materialize


def test_merge_is_refused_and_materialize_merges_into_a_dense_model() -> None:
    base = _hf("llama")
    model = get_lora_model(base, _lora(), seed=0)
    ids = hf_models.sample_ids()
    lora_logits = hf_models.logits(model, ids)
    weight = base.model.layers[1].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(MergeError, match=r"layer_replication=\[\[0, 2\], \[1, 3\]\].*materialize=True"):
            merge()
    assert torch.equal(weight, before) and not any(layer.merged for _, layer in model.lora_layers())

    layer_bytes = sum(p.numel() * p.element_size() for p in _base_params(base.model.layers[1]).values())
    assert model.materialize_replicated_layers() == layer_bytes  # position 2's copy of layer 1
    merged = model.merge_and_unload(materialize=True)  # already materialized: nothing more to copy
    assert len(merged.model.layers) == 4 and merged.config.num_hidden_layers == 4
    pointers = [p.data_ptr() for p in merged.parameters()]
    assert len(pointers) == len(set(pointers))  # a dense model: no storage shared
    q1, q2 = merged.model.layers[1].self_attn.q_proj.weight, merged.model.layers[2].self_attn.q_proj.weight
    assert not torch.equal(q1, q2) and not torch.equal(q1, before)
    torch.testing.assert_close(hf_models.logits(merged, ids), lora_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input and adapter rules


@pytest.mark.parametrize(
    "value, error",
    [
        ([[0, 2], [2, 2]], r"layer_replication range \[2, 2\] needs 0 <= start < end"),
        ([[3, 1]], r"layer_replication range \[3, 1\] needs 0 <= start < end"),
        ("0-2", r"layer_replication must be a list of \[start, end\) pairs, got '0-2'"),
        ([[0, 2], 5], r"layer_replication range 5 must be a pair of integers"),
    ],
)
def test_bad_ranges_are_refused_by_the_config(value, error) -> None:
    with pytest.raises(ConfigError, match=error):
        LoraConfig(layer_replication=value)


def test_range_beyond_the_model_is_refused_and_the_model_is_unchanged() -> None:
    base = _hf("llama")
    with pytest.raises(ConfigError, match=r"range \[1, 4\] reaches beyond the model's 3 layers"):
        get_lora_model(base, _lora(layer_replication=[[0, 2], [1, 4]]), seed=0)
    assert len(base.model.layers) == 3 and base.config.num_hidden_layers == 3


def test_a_failed_adapter_leaves_the_model_unreplicated() -> None:
    base = _hf("qwen2")
    layers = list(base.model.layers)
    with pytest.raises(ConfigError, match="matched no module"):
        get_lora_model(base, _lora(target_modules=["no_such_module"]), seed=0)
    assert list(base.model.layers) == layers and base.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert base.config.layer_types == ["full_attention"] * 3


def test_every_adapter_must_give_the_same_ranges() -> None:
    model = get_lora_model(_hf("llama"), _lora(), seed=0)
    model.add_adapter("same", _lora())  # no second expansion
    assert len(model.model.model.layers) == 4
    for ranges in (None, [[0, 3]]):
        with pytest.raises(ConfigError, match=r"replicated with layer_replication=\[\[0, 2\], \[1, 3\]\]"):
            model.add_adapter("other", _lora(layer_replication=ranges))
    plain = get_lora_model(_hf("llama"), _lora(layer_replication=None), seed=0)
    with pytest.raises(ConfigError, match="must be given by the first adapter"):
        plain.add_adapter("late", _lora())


# ---------------------------------------------------------------------------------------------
# megatron GPTModel: TP=2 with SP on and off, sharded save, resume, consolidation


MEGATRON_HF = dict(hf_models.MEGATRON_LLAMA, num_hidden_layers=3, tie_word_embeddings=False)


def _megatron_ids() -> torch.Tensor:
    return torch.randint(MEGATRON_HF["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(7))


def _megatron_run(hf_dir: str, tp: int, sp: bool, save_to: str | None, load_from: str | None) -> dict:
    from dist_lora.bridges import build_megatron_gpt
    from dist_lora.checkpoint.sharded import load_sharded, save_sharded
    from tests.tp_utils import gather_tp

    base = build_megatron_gpt(hf_dir, tp=tp, sequence_parallel=sp)
    model = get_lora_model(base, _lora(r=4, target_modules=None), seed=1 if load_from else 0)
    if load_from:
        load_sharded(model, load_from)
    layers = base.decoder.layers
    qkv = [layer.self_attention.linear_qkv for layer in layers]
    with torch.no_grad():
        logits = gather_tp(model(_megatron_ids(), None, None), dim=-1)
    if save_to:
        save_sharded(model, save_to)
    return dict(
        logits=logits,
        layer_numbers=[layer.layer_number for layer in layers],
        attention_numbers=[layer.self_attention.layer_number for layer in layers],
        num_layers=base.config.num_layers,
        shared=qkv[2].base_layer.weight is qkv[1].base_layer.weight and qkv[2].base_layer is not qkv[1].base_layer,
        separate=qkv[2].lora_A["default"].weight is not qkv[1].lora_A["default"].weight,
    )


def test_megatron_replication_tp_sp_checkpoint_and_peft(tmp_path) -> None:
    from dist_lora.release.consolidate import consolidate
    from dist_lora.release.errors import ConsolidationError
    from tests.harness import run_distributed

    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    LlamaForCausalLM(LlamaConfig(**MEGATRON_HF)).save_pretrained(hf_dir)
    ckpt = str(tmp_path / "ckpt")

    runs = {
        "tp1": run_distributed(_megatron_run, 1, tp=1, args=(hf_dir, 1, False, None, None)),
        "tp2": run_distributed(_megatron_run, 2, tp=2, args=(hf_dir, 2, False, ckpt, None)),
        "tp2_sp": run_distributed(_megatron_run, 2, tp=2, args=(hf_dir, 2, True, None, None)),
        "resume_tp2_sp": run_distributed(_megatron_run, 2, tp=2, args=(hf_dir, 2, True, None, ckpt)),
    }
    reference = runs["tp1"][0]
    assert reference["layer_numbers"] == reference["attention_numbers"] == [1, 2, 3, 4]
    assert reference["num_layers"] == 4
    for name, results in runs.items():
        for rank in results:
            assert rank["shared"] and rank["separate"], name
            torch.testing.assert_close(rank["logits"], reference["logits"], atol=1e-5, rtol=0, msg=name)

    with open(os.path.join(ckpt, "manifest.json")) as f:
        keys = {e["key"] for info in json.load(f)["files"].values() for e in info["tensors"].values()}
    assert {int(re.match(r"decoder\.layers\.(\d+)\.", k)[1]) for k in keys} == {0, 1, 2, 3}

    out = str(tmp_path / "adapter")
    consolidate(ckpt, out, hf_model_dir=hf_dir, show_progress=False)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["layer_replication"] == RANGES
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=_megatron_ids()).logits
    torch.testing.assert_close(peft_logits, reference["logits"], atol=1e-4, rtol=0)
    _check_peft_used_every_key(peft_model, out)

    # An HF model with too few layers for the ranges is named as such (and nothing is written).
    small = str(tmp_path / "hf_2_layers")
    LlamaConfig(**dict(MEGATRON_HF, num_hidden_layers=2)).save_pretrained(small)
    with pytest.raises(ConsolidationError, match=r"range \[1, 3\] reaches beyond the model's 2 layers"):
        consolidate(ckpt, str(tmp_path / "bad"), hf_model_dir=small, show_progress=False)
    assert not os.path.exists(tmp_path / "bad")
