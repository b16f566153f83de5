"""PEFT adapter -> sharded megatron model (:mod:`dist_lora.release.to_megatron`).

Adapters are made with the real PEFT (``init_lora_weights=False``, so B != 0) on tiny HF Llama
(GQA), Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim 12 != hidden/heads) models and
saved with ``save_pretrained``: all-linear, PEFT's default q_proj + v_proj, rank/alpha
patterns that give q, k, v different ranks and alphas with rsLoRA, lora_bias on Qwen2, and one
edited to share A across q/k/v and gate/up (the layout ``consolidate`` writes). Each is loaded
into megatron GPTModels at TP=1, 2 (SP off and on) and 4, whose gathered logits must equal the
PEFT model's (fp32, atol 1e-4). Round trips through ``save_sharded`` + ``consolidate``: the
shared-A file comes back bit for bit, the PEFT file (different A's, so rank 3r fused) with the
same logits in PEFT. Bad input fails with a message that names the key or field, before the
model is touched (a Qwen3 adapter into a megatron model without q/k norms too)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dist_lora.bridges import merge_gate_up, merge_qkv_rows  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from dist_lora.release.to_megatron import load_peft_adapter_into_megatron  # noqa: E402
from dist_lora.release.translate import PeftToMegatronError, translate_peft_adapter  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402

VOCAB, BATCH, SEQ = 128, 2, 16
COMMON = dict(MEGATRON_LLAMA, tie_word_embeddings=False)
HEADS, GROUPS, HEAD_DIM = 8, 4, 8
# kind -> (HF class, config class, config fields besides COMMON)
HF_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 12}),
}


def _out_rows(head_dim: int) -> dict[str, int]:
    return {"self_attn.q_proj": HEADS * head_dim, "self_attn.k_proj": GROUPS * head_dim,
            "self_attn.v_proj": GROUPS * head_dim, "mlp.gate_proj": 128, "mlp.up_proj": 128}

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (HF model, PEFT LoraConfig fields besides init_lora_weights=False)
ADAPTERS = {
    "all": ("llama", dict(target_modules="all-linear", r=4, lora_alpha=8)),
    "qv": ("llama", dict()),  # PEFT's defaults: q_proj + v_proj, r=8, alpha=8
    "patterns": (
        "llama",
        dict(
            target_modules=ALL7,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"k_proj": 2, "v_proj": 6, "down_proj": 3, "model.layers.1.mlp.up_proj": 5},
            alpha_pattern={"q_proj": 5, "gate_proj": 3},
        ),
    ),
    "qwen_bias": (
        "qwen2",
        dict(target_modules=ALL7[:6], r=4, lora_alpha=8, lora_bias=True, rank_pattern={"v_proj": 2}),
    ),
    "qwen3": ("qwen3", dict(target_modules="all-linear", r=4, lora_alpha=8, rank_pattern={"k_proj": 2})),
}
LLAMA_ADAPTERS = ["all", "qv", "patterns", "shared"]  # "shared": "all" with A shared by q/k/v, gate/up
LAYOUTS = [(1, False), (2, False), (2, True), (4, False)]  # (TP, sequence parallel)


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _build_hf(kind: str, directory, **overrides) -> str:
    cls, config_cls, extra = HF_MODELS[kind]
    torch.manual_seed(0)
    model = cls(config_cls(**{**COMMON, **extra, **overrides}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF zeroes biases and sets q/k norms to 1: give them values
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)
    return str(directory)


def _fresh(hf_dir: str):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _make_peft_adapter(hf_dir: str, directory, seed: int = 0, **fields) -> tuple[str, torch.Tensor]:
    """Save a real PEFT adapter with random A and B; return (directory, the PEFT model's logits)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_fresh(hf_dir), peft.LoraConfig(init_lora_weights=False, **fields)).eval()
    model.save_pretrained(directory)
    return str(directory), _hf_logits(model)


def _share_a(src: str, dst: str) -> str:
    """Copy of an adapter with k/v using q's A and up using gate's A (r and alpha all equal)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    tensors = load_file(path)
    for key in list(tensors):
        for source, targets in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
            if f".{source}.lora_A." in key:
                for target in targets:
                    tensors[key.replace(source, target)] = tensors[key].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("peft_to_megatron")
    hf = {kind: _build_hf(kind, root / kind) for kind in HF_MODELS}
    adapters, logits = {}, {}
    for name, (kind, fields) in ADAPTERS.items():
        adapters[name], logits[name] = _make_peft_adapter(hf[kind], root / f"adapter_{name}", **fields)
    adapters["shared"] = _share_a(adapters["all"], str(root / "adapter_shared"))
    logits["shared"] = _hf_logits(peft.PeftModel.from_pretrained(_fresh(hf["llama"]), adapters["shared"]).eval())
    base = {kind: _hf_logits(_fresh(directory)) for kind, directory in hf.items()}
    for name, value in logits.items():  # every adapter changes the function visibly
        kind = ADAPTERS.get(name, ("llama",))[0]
        assert (value - base[kind]).abs().max() > 0.1, name
    return {"root": root, "hf": hf, "adapters": adapters, "logits": logits}


# ---------------------------------------------------------------------------------------------
# Translation (one process)


def _parts(adapter_dir: str) -> tuple[dict, dict]:
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return tensors, json.load(open(os.path.join(adapter_dir, "adapter_config.json")))


def _part_delta(tensors: dict, config: dict, module: str, suffix: str = "weight"):
    """s·B·A (or s·bias) of one HF module from the PEFT file, None if it has no adapter."""
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in tensors:
        return None
    short = module.rsplit(".", 1)[1]
    r = config["rank_pattern"].get(short, config["rank_pattern"].get(module, config["r"]))
    alpha = config["alpha_pattern"].get(short, config["alpha_pattern"].get(module, config["lora_alpha"]))
    s = alpha / r**0.5 if config["use_rslora"] else alpha / r
    if suffix == "bias":
        return s * tensors[f"{key}.lora_B.bias"]
    return s * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]


@pytest.mark.parametrize("name", list(ADAPTERS) + ["shared"])
def test_fused_delta_equals_parts(setup, name) -> None:
    """s_f·B'A' of each fused module is the parts' s_i·B_i·A_i merged (zeros where absent)."""
    adapter_dir = setup["adapters"][name]
    kind = ADAPTERS.get(name, ("llama",))[0]
    translated = translate_peft_adapter(adapter_dir, setup["hf"][kind])
    tensors, config = _parts(adapter_dir)
    rslora = config["use_rslora"]
    head_dim = HF_MODELS[kind][2].get("head_dim", HEAD_DIM)
    out_rows = _out_rows(head_dim)
    for module, f in translated.modules.items():
        layer = module.split(".")[2]
        s_f = f.lora_alpha / f.r**0.5 if rslora else f.lora_alpha / f.r
        assert (f.a.shape[0], f.b.shape[1]) == (f.r, f.r), module
        fused = translated.config.rank_for(module), translated.config.alpha_for(module)
        assert fused == (f.r, f.lora_alpha), module
        subs = {"linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "linear_fc1": ["mlp.gate_proj", "mlp.up_proj"], "linear_proj": ["self_attn.o_proj"],
                "linear_fc2": ["mlp.down_proj"]}[module.rsplit(".", 1)[1]]
        for suffix in ("weight", "bias") if f.bias is not None else ("weight",):
            deltas = [_part_delta(tensors, config, f"model.layers.{layer}.{sub}", suffix) for sub in subs]
            ref = next(d for d in deltas if d is not None)
            deltas = [torch.zeros(out_rows[sub], *ref.shape[1:]) if d is None else d for sub, d in zip(subs, deltas)]
            if len(subs) == 3:
                want = merge_qkv_rows(*deltas, HEADS, GROUPS, head_dim)
            elif len(subs) == 2:
                want = merge_gate_up(*deltas)
            else:
                want = deltas[0]
            got = s_f * (f.b @ f.a if suffix == "weight" else f.bias)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=f"{name} {module} {suffix}")


def test_layouts_and_translated_config(setup) -> None:
    hf = setup["hf"]["llama"]
    qkv0, fc1_1 = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc1"

    # PEFT's default adapter: q and v only, different A's -> stacked rank 2r; both scale 1, kept.
    qv = translate_peft_adapter(setup["adapters"]["qv"], hf)
    f = qv.modules[qkv0]
    assert (f.layout, f.r, f.lora_alpha, f.parts) == ("stacked", 16, 16, ("model.layers.0.self_attn.q_proj",
                                                                         "model.layers.0.self_attn.v_proj"))
    tensors = load_file(os.path.join(setup["adapters"]["qv"], "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn."
    a_q, a_v = tensors[prefix + "q_proj.lora_A.weight"], tensors[prefix + "v_proj.lora_A.weight"]
    assert torch.equal(f.a, torch.cat([a_q, a_v]))
    per_group = f.b.reshape(GROUPS, (HEADS // GROUPS + 2) * HEAD_DIM, 16)  # [q heads of g, k, v] per group g
    q_rows, k_rows, v_rows = torch.split(per_group, [16, 8, 8], dim=1)
    assert torch.equal(q_rows.reshape(-1, 16)[:, :8], tensors[prefix + "q_proj.lora_B.weight"])  # copied, unscaled
    assert not q_rows[..., 8:].any() and not k_rows.any() and not v_rows[..., :8].any()
    assert sorted(qv.modules) == sorted(qv.config.target_modules)
    assert qv.config.target_modules == [f"decoder.layers.{i}.self_attention.linear_qkv" for i in range(2)]
    assert qv.config.rank_pattern == {m: 16 for m in qv.config.target_modules}
    assert qv.config.alpha_pattern == {m: 16 for m in qv.config.target_modules}
    assert qv.config.layers_to_transform is None and qv.config.base_model_name_or_path == hf

    # Different ranks and alphas (rsLoRA): stacked, fused scale 1, each block pre-scaled.
    patterns = translate_peft_adapter(setup["adapters"]["patterns"], hf)
    f = patterns.modules[qkv0]
    assert (f.layout, f.r, f.lora_alpha) == ("stacked", 4 + 2 + 6, 12**0.5)
    assert patterns.modules[fc1_1].r == 4 + 5
    assert patterns.modules["decoder.layers.0.mlp.linear_fc2"].r == 3
    assert patterns.config.use_rslora and patterns.config.r == 4 and patterns.config.lora_alpha == 8

    # Shared A (what consolidate writes): the fused adapter is the original rank-r one.
    shared = translate_peft_adapter(setup["adapters"]["shared"], hf)
    assert {(m.layout, m.r, m.lora_alpha) for m in shared.modules.values()} == {("shared", 4, 8), ("single", 4, 8)}
    assert shared.config.rank_pattern == {} and shared.config.alpha_pattern == {}

    # Same scale, different A's: stacked rank 3r with alpha 3·alpha, B copied unscaled.
    all_linear = translate_peft_adapter(setup["adapters"]["all"], hf)
    assert (all_linear.modules[qkv0].r, all_linear.modules[qkv0].lora_alpha) == (12, 24)
    assert all_linear.state_dict()[f"base_model.model.{qkv0}.lora_B.weight"].shape == (128, 12)


# ---------------------------------------------------------------------------------------------
# Logits parity at TP=1/2/4 (inside run_distributed)


def _forward(model) -> torch.Tensor:
    from tests.tp_utils import gather_tp

    with torch.no_grad():
        out = model(_ids(), None, None)
    assert out.shape == (BATCH, SEQ, VOCAB // model.config.tensor_model_parallel_size), out.shape
    return gather_tp(out, dim=-1)


def _megatron_run(hf: dict, adapters: dict, tp: int, sp: bool, save_dir):
    from megatron.core import parallel_state

    from dist_lora.bridges import build_megatron_gpt
    from dist_lora.checkpoint.sharded import save_sharded
    from dist_lora.model import LoraModel

    out, info = {}, {}
    gpt = build_megatron_gpt(hf["llama"], tp=tp, sequence_parallel=sp)
    model = load_peft_adapter_into_megatron(gpt, adapters["all"], hf["llama"], adapter_name="all")  # bare model
    assert isinstance(model, LoraModel) and model.model is gpt and model.active_adapters == ["all"]
    for name in LLAMA_ADAPTERS[1:]:  # into the existing LoraModel
        assert load_peft_adapter_into_megatron(model, adapters[name], hf["llama"], adapter_name=name) is model
    assert not any(p.requires_grad for p in model.parameters())  # is_trainable=False
    model.eval()
    qkv = model.model.decoder.layers[0].self_attention.linear_qkv
    for name in LLAMA_ADAPTERS:
        model.set_adapter(name)
        out[name] = _forward(model)
        info[name] = (qkv.r[name], qkv.scaling[name], tuple(qkv.lora_B[name].weight.shape))
    if save_dir is not None:
        for name in ("all", "shared"):
            save_sharded(model, os.path.join(save_dir, name), adapter=name)

    gpt = build_megatron_gpt(hf["qwen2"], tp=tp, sequence_parallel=sp)
    model = load_peft_adapter_into_megatron(gpt, adapters["qwen_bias"], hf["qwen2"], is_trainable=True).eval()
    assert model.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    out["qwen_bias"] = _forward(model)

    gpt = build_megatron_gpt(hf["qwen3"], tp=tp, sequence_parallel=sp)
    out["qwen3"] = _forward(load_peft_adapter_into_megatron(gpt, adapters["qwen3"], hf["qwen3"]).eval())
    return out, info, parallel_state.get_tensor_model_parallel_rank()


_RUNS: dict = {}


@pytest.fixture(scope="module")
def megatron(setup):
    def get(tp: int, sp: bool):
        if (tp, sp) not in _RUNS:
            save_dir = str(setup["root"] / "sharded") if (tp, sp) == (2, False) else None
            results = run_distributed(_megatron_run, tp, tp=tp, args=(setup["hf"], setup["adapters"], tp, sp, save_dir))
            for out, _, _ in results[1:]:  # every TP rank gathered the same logits
                assert all(torch.equal(out[k], results[0][0][k]) for k in out)
            _RUNS[(tp, sp)] = results[0][:2]
        return _RUNS[(tp, sp)]

    yield get
    _RUNS.clear()


@pytest.mark.parametrize("tp,sp", LAYOUTS, ids=[f"tp{tp}{'_sp' if sp else ''}" for tp, sp in LAYOUTS])
def test_logits_match_peft(setup, megatron, tp, sp) -> None:
    out, info = megatron(tp, sp)
    for name, want in setup["logits"].items():
        torch.testing.assert_close(out[name], want, atol=1e-4, rtol=0, msg=lambda m: f"adapter {name}: {m}")
    # linear_qkv of layer 0: fused rank, scaling and this rank's B shard [(H+2G)·d / tp, R].
    rows = (HEADS + 2 * GROUPS) * HEAD_DIM // tp
    assert info["all"] == (12, 2.0, (rows, 12))
    assert info["qv"] == (16, 1.0, (rows, 16))
    assert info["patterns"] == (12, 1.0, (rows, 12))
    assert info["shared"] == (4, 2.0, (rows, 4))


def _pipeline_run(hf_dir: str, adapter_dir: str):
    """TP=1, PP=2: each stage holds one layer; patterns and tensors use the global index."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dist_lora.bridges import build_megatron_gpt

    model = load_peft_adapter_into_megatron(build_megatron_gpt(hf_dir, pp=2), adapter_dir, hf_dir).eval()
    translated = translate_peft_adapter(adapter_dir, hf_dir)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    fc1 = model.model.decoder.layers[0].mlp.linear_fc1  # local layer 0 = global layer `stage`
    assert torch.equal(fc1.lora_A["default"].weight, translated.modules[f"decoder.layers.{stage}.mlp.linear_fc1"].a)
    assert fc1.r["default"] == (4 + 4, 4 + 5)[stage]  # gate 4 + up 4 (layer 0) or 5 (layer 1)
    with torch.no_grad():
        if stage == 1:
            hidden = torch.empty(SEQ, BATCH, COMMON["hidden_size"])
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.model.set_input_tensor(hidden)
        out = model(_ids(), None, None)
        if stage == 0:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
    return out


def test_pipeline_parallel_uses_global_layer_names(setup) -> None:
    out = run_distributed(_pipeline_run, 2, pp=2, args=(setup["hf"]["llama"], setup["adapters"]["patterns"]))[1]
    torch.testing.assert_close(out, setup["logits"]["patterns"], atol=1e-4, rtol=0)


def test_round_trip_through_consolidate(setup, megatron, tmp_path) -> None:
    """load at TP=2 -> save_sharded -> consolidate: the shared-A file comes back bit for bit;
    PEFT's file (different A's) comes back as rank-3r q/k/v (gate/up: 2r) with the same logits."""
    megatron(2, False)
    hf = setup["hf"]["llama"]
    sharded = setup["root"] / "sharded"

    out = consolidate(sharded / "shared", tmp_path / "shared", hf_model_dir=hf, show_progress=False)
    original, _ = _parts(setup["adapters"]["shared"])
    back, config = _parts(out)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 8, {}, {})

    out = consolidate(sharded / "all", tmp_path / "all", hf_model_dir=hf, show_progress=False)
    original, _ = _parts(setup["adapters"]["all"])
    back, config = _parts(out)
    assert set(back) == set(original)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert back[f"{q}.lora_A.weight"].shape == (12, 64) and config["rank_pattern"][q.split("model.", 2)[2]] == 12
    assert torch.equal(back[f"{q}.lora_B.weight"][:, :4], original[f"{q}.lora_B.weight"])
    for key in original:  # o_proj and down_proj are not fused: unchanged
        if "o_proj" in key or "down_proj" in key:
            assert torch.equal(back[key], original[key]), key
    peft_model = peft.PeftModel.from_pretrained(_fresh(hf), out).eval()
    torch.testing.assert_close(_hf_logits(peft_model), setup["logits"]["all"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def _edit(src: str, dst, tensors=None, config=None) -> str:
    """A copy of adapter ``src`` with its tensors / config replaced by ``tensors(dict)`` /
    ``config(dict)``."""
    dst = shutil.copytree(src, str(dst))
    if tensors is not None:
        path = os.path.join(dst, "adapter_model.safetensors")
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    if config is not None:
        path = os.path.join(dst, "adapter_config.json")
        data = json.load(open(path))
        json.dump(config(data) or data, open(path, "w"))
    return dst


def _rename(old: str, new: str):
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def _drop(fragment: str):
    return lambda tensors: {k: v for k, v in tensors.items() if fragment not in k}


BAD_EDITS = {
    "gpt2_names": (
        dict(tensors=_rename("self_attn.q_proj", "attn.c_attn")),
        r"base_model\.model\.model\.layers\.0\.attn\.c_attn\.lora_A\.weight'.*not a module of a Llama-family",
    ),
    "megatron_format": (
        dict(tensors=_rename("model.layers.", "decoder.layers.")),
        r"megatron-format adapter.*LoraModel\.from_pretrained",
    ),
    "missing_b": (
        dict(tensors=_drop("layers.1.mlp.up_proj.lora_B")),
        r"model\.layers\.1\.mlp\.up_proj has an incomplete adapter: missing .*up_proj\.lora_B\.weight",
    ),
    "missing_module": (
        dict(tensors=_drop("layers.1.mlp.up_proj.")),
        r"targets \['model\.layers\.1\.mlp\.up_proj'\].*no LoRA factors",
    ),
    "untargeted_module": (
        dict(config=lambda c: c.update(target_modules=[m for m in c["target_modules"] if "1.mlp.up" not in m])),
        r"LoRA factors for \['model\.layers\.1\.mlp\.up_proj'\], which adapter_config\.json does not target",
    ),
    "rank_mismatch": (
        dict(config=lambda c: c.update(rank_pattern={"o_proj": 2})),
        r"o_proj\.lora_A\.weight' has rank 4, but adapter_config\.json gives .*o_proj rank 2",
    ),
    "pissa": (
        dict(config=lambda c: c.update(init_lora_weights="pissa")),
        r"init_lora_weights='pissa' changes the base",
    ),
    "base_bias": (
        dict(tensors=lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
        r"q_proj\.bias' is not a LoRA factor",
    ),
    "unknown_feature": (
        dict(config=lambda c: c.update(trainable_token_indices=[1, 2])),
        r"PEFT features dist_lora does not support: trainable_token_indices",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_adapter_files_are_refused(setup, tmp_path, case) -> None:
    edits, match = BAD_EDITS[case]
    bad = _edit(setup["adapters"]["all"], tmp_path / case, **edits)
    with pytest.raises(PeftToMegatronError, match=match):
        translate_peft_adapter(bad, setup["hf"]["llama"])


@pytest.mark.parametrize(
    "case,fields,match",
    [
        ("dora", dict(target_modules=["q_proj"], use_dora=True), r"DoRA"),
        ("lm_head", dict(target_modules=["q_proj", "lm_head"]),
         r"'base_model\.model\.lm_head\..*': lm_head is not supported.*not LoRA on lm_head"),
        ("modules_to_save", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
         r"'base_model\.model\.lm_head\.weight': lm_head is not supported.*modules_to_save"),
    ],
)
def test_unsupported_peft_features_are_refused(setup, tmp_path, case, fields, match) -> None:
    adapter_dir, _ = _make_peft_adapter(setup["hf"]["llama"], tmp_path / case, **fields)
    with pytest.raises(PeftToMegatronError, match=match):
        translate_peft_adapter(adapter_dir, setup["hf"]["llama"])


def test_targets_follow_peft_full_name_rule(setup, tmp_path) -> None:
    """PEFT 0.21 targets a module named in full in target_modules whatever layers_to_transform
    says: the loader's check of the file against its config applies PEFT's rule
    (dist_lora.targeting.is_targeted with full_name_skips_layers)."""
    fields = dict(target_modules=["q_proj", "model.layers.1.self_attn.v_proj"], layers_to_transform=[0])
    adapter_dir, _ = _make_peft_adapter(setup["hf"]["llama"], tmp_path / "a", **fields)
    translated = translate_peft_adapter(adapter_dir, setup["hf"]["llama"])
    assert list(translated.modules) == [f"decoder.layers.{i}.self_attention.linear_qkv" for i in range(2)]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
         r"down_proj\.lora_B\.weight' has shape \[32, 4\], expected \[64, 4\] \(model\.layers\.0\.mlp\.down_proj of "
         r"the HF model at .* has out_features 64"),
        (dict(num_hidden_layers=3), r"is for layer 2, but the HF model at .* has 2 layers"),
    ],
    ids=["hidden_size", "layers"],
)
def test_adapter_for_a_different_model_is_refused(setup, tmp_path, overrides, match) -> None:
    other = _build_hf("llama", tmp_path / "other", **overrides)
    adapter_dir, _ = _make_peft_adapter(other, tmp_path / "adapter", target_modules="all-linear", r=4)
    with pytest.raises(PeftToMegatronError, match=match):
        translate_peft_adapter(adapter_dir, setup["hf"]["llama"])


def test_hf_model_is_refused(setup) -> None:
    with pytest.raises(TypeError, match=r"needs a megatron GPTModel.*LoraModel\.from_pretrained"):
        load_peft_adapter_into_megatron(_fresh(setup["hf"]["llama"]), setup["adapters"]["qv"], setup["hf"]["llama"])


def _bad_megatron_loads(hf: dict, adapters: dict, wide_hf: str, wide_adapter: str):
    from dist_lora.bridges import build_megatron_gpt

    gpt = build_megatron_gpt(hf["llama"], tp=2)
    flags = [p.requires_grad for p in gpt.parameters()]
    messages = []
    try:  # the megatron model is not the HF model the adapter is for
        load_peft_adapter_into_megatron(gpt, wide_adapter, wide_hf)
    except PeftToMegatronError as e:
        messages.append(str(e))
    assert [p.requires_grad for p in gpt.parameters()] == flags and not hasattr(gpt, "peft_config")
    model = load_peft_adapter_into_megatron(gpt, adapters["qv"], hf["llama"], adapter_name="qv")
    for adapter_dir, hf_dir, name in ((wide_adapter, wide_hf, "wide"), (adapters["all"], hf["llama"], "qv")):
        try:
            load_peft_adapter_into_megatron(model, adapter_dir, hf_dir, adapter_name=name)
        except ValueError as e:
            messages.append(str(e))
    assert list(model.peft_config) == ["qv"]
    layers = [n for n, _ in model.lora_layers()]
    assert layers == [f"decoder.layers.{i}.self_attention.linear_qkv" for i in range(2)], layers
    return messages


def test_megatron_model_mismatch_and_name_clash_leave_the_model_unchanged(setup, tmp_path) -> None:
    wide_hf = _build_hf("llama", tmp_path / "wide", intermediate_size=256)
    wide_adapter, _ = _make_peft_adapter(wide_hf, tmp_path / "adapter", target_modules="all-linear", r=4)
    messages = run_distributed(
        _bad_megatron_loads, 2, tp=2, args=(setup["hf"], setup["adapters"], wide_hf, wide_adapter)
    )[0]
    assert len(messages) == 3, messages
    assert "the megatron model does not match the HF model" in messages[0]
    assert "ffn_hidden_size 128 (HF: 256)" in messages[0]
    assert "ffn_hidden_size 128 (HF: 256)" in messages[1]
    assert "adapter 'qv' already exists" in messages[2]


def _qwen3_adapter_into_llama(llama_hf: str, qwen3_adapter: str, qwen3_hf: str) -> str:
    from dist_lora.bridges import build_megatron_gpt

    gpt = build_megatron_gpt(llama_hf)
    with pytest.raises(PeftToMegatronError) as error:
        load_peft_adapter_into_megatron(gpt, qwen3_adapter, qwen3_hf)
    assert not hasattr(gpt, "peft_config")
    return str(error.value)


def test_qwen3_adapter_into_a_model_without_qk_norms_is_refused(setup, tmp_path) -> None:
    """Same geometry (head_dim 12) but no q/k norms: the geometry alone would not tell."""
    llama = _build_hf("llama", tmp_path / "llama12", head_dim=12)
    message = run_distributed(
        _qwen3_adapter_into_llama, 1, args=(llama, setup["adapters"]["qwen3"], setup["hf"]["qwen3"])
    )[0]
    assert "the megatron model does not match the HF model" in message and "qk_layernorm False (HF: True)" in message
