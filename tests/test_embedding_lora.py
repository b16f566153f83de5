"""LoRA on embeddings (issue #14), against the real PEFT 0.21.2 and real megatron-core.

Hugging Face ``nn.Embedding`` (tiny Llama / GPT-2 and a bare module): the same targets as
PEFT (by name; ``all-linear`` never picks an embedding), the same logits from the same adapter
files in both directions (plain and DoRA), the same gradients (padding_idx, embed_scale), the
same merged weights and weighted combinations, and clear refusals that leave the model as it was.

megatron ``VocabParallelEmbedding`` (tiny GPTModel): TP=2 with SP off and on computes the same
losses, gathered gradients and adapters after AdamW steps as TP=1 (plain and DoRA), the
replicated B stays identical on both ranks, LoRA adds no collective beyond the once-per-step
sum, and a sharded TP=2 checkpoint consolidates into a file the real PEFT loads onto the HF
Llama with the megatron model's logits (and reloads at TP=1; ``dist-lora merge`` exports it
merged into the HF checkpoint with the same logits).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.bridges import build_megatron_gpt  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from dist_lora.release.merged import merge_export  # noqa: E402
from dist_lora.checkpoint.sharded import load_sharded, save_sharded  # noqa: E402
from dist_lora.config import ConfigError  # noqa: E402
from dist_lora.layers import LoraEmbedding  # noqa: E402
from dist_lora.model import LoraModel  # noqa: E402
from dist_lora.parallel.comm_counter import CollectiveCounter  # noqa: E402
from dist_lora.parallel.grads import finalize_lora_grads, tp_partial_grad_parameters  # noqa: E402
from dist_lora.targeting import find_targets  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA, VOCAB, tiny_gpt2, tiny_llama  # noqa: E402
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config, train_lora  # noqa: E402
from tests.tp_utils import all_tp_copies, gather_param, gather_tp  # noqa: E402

EMB = "base_model.model.model.embed_tokens"


def _ids(vocab: int = VOCAB, seed: int = 7) -> torch.Tensor:
    return torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft(model: nn.Module, **kwargs) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def _peft_targets(model: nn.Module, **kwargs) -> set[str]:
    pm = _peft(copy.deepcopy(model), **kwargs)
    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---------------------------------------------------------------------------------------------
# Hugging Face nn.Embedding


@pytest.mark.parametrize(
    "factory, targets",
    [(tiny_llama, ["embed_tokens", "q_proj"]), (tiny_gpt2, ["wte", "wpe", "c_attn"]),
     (tiny_llama, r".*(embed_tokens|v_proj)"), (tiny_llama, "all-linear"), (tiny_gpt2, "all-linear")],
)
def test_targets_match_peft(factory, targets) -> None:
    model = factory()
    ours = set(find_targets(model, LoraConfig(target_modules=targets)))
    assert ours == _peft_targets(model, target_modules=targets)
    assert any("embed" in n or n.endswith(("wte", "wpe")) for n in ours) == (targets != "all-linear")


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"use_rslora": True, "lora_alpha": 3}])
def test_dist_lora_files_load_in_peft_with_the_same_logits(tmp_path, extra) -> None:
    config = {**dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False), **extra}
    model = get_lora_model(tiny_llama(), LoraConfig(**config), seed=0).eval()
    assert isinstance(model.model.model.embed_tokens, LoraEmbedding)
    ids = _ids()
    want = _logits(model, ids)
    assert (want - _logits(tiny_llama(), ids)).abs().max() > 0.1, "the adapters must change the logits"
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    emb_keys = {k for k in saved if k.startswith(EMB)}
    want_keys = {f"{EMB}.lora_embedding_A", f"{EMB}.lora_embedding_B"} | (
        {f"{EMB}.lora_magnitude_vector"} if extra.get("use_dora") else set()
    )
    assert emb_keys == want_keys
    assert saved[f"{EMB}.lora_embedding_A"].shape == (4, VOCAB) and saved[f"{EMB}.lora_embedding_B"].shape == (32, 4)

    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert isinstance(peft_model.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    torch.testing.assert_close(_logits(peft_model, ids), want, atol=1e-5, rtol=0)
    used = peft.utils.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert set(used) == set(saved), "PEFT must use every saved key (it silently ignores unknown ones)"


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}])
def test_peft_files_load_in_dist_lora_with_the_same_logits(tmp_path, extra) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False, **extra)
    peft_model = _peft(tiny_llama(), **config).eval()
    ids = _ids()
    want = _logits(peft_model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)  # with the base embedding weight (save_embedding_layers)
    assert f"{EMB}.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(ours, ids), want, atol=1e-5, rtol=0)
    layer = ours.model.model.embed_tokens
    torch.testing.assert_close(layer.lora_embedding_A["default"],
                               peft_model.base_model.model.model.embed_tokens.lora_embedding_A["default"])


def test_merge_and_unmerge_match_peft(tmp_path) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False, use_dora=True)
    peft_model = _peft(tiny_llama(), **config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = _ids()
    want = _logits(ours, ids)
    base = ours.model.model.embed_tokens.base_layer.weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, ids), want, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.model.model.embed_tokens.base_layer.weight, base, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload().model.embed_tokens.weight
    peft_merged = peft_model.merge_and_unload().model.embed_tokens.weight
    torch.testing.assert_close(merged, peft_merged, atol=1e-6, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-3


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination_type) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    ours = get_lora_model(tiny_llama(), LoraConfig(**config), seed=0)
    ours.add_adapter("other", LoraConfig(**config))
    theirs = _peft(tiny_llama(), **config)
    theirs.add_adapter("other", peft.LoraConfig(**config))
    layer, peft_layer = ours.model.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        for name in ("default", "other"):
            peft_layer.lora_embedding_A[name].copy_(layer.lora_A[name].weight)
            peft_layer.lora_embedding_B[name].copy_(layer.lora_B[name].weight)
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "other"], [0.7, 0.4], "mix", combination_type=combination_type)
        model.set_adapter("mix")
    ids = _ids()
    assert (_logits(ours, ids) - _logits(tiny_llama(), ids)).abs().max() > 0.1
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=0)


class _ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output (like Gemma's), with ``embed_scale`` as PEFT expects."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = 2.5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class _Tiny(nn.Module):
    def __init__(self, scaled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = (_ScaledEmbedding if scaled else nn.Embedding)(20, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("scaled", [False, True])
def test_forward_and_gradients_match_peft(scaled) -> None:
    """The same factors give PEFT's output and PEFT's factor gradients (padding_idx: no
    gradient to that row of Aᵀ; embed_scale applies to the adapter too)."""
    config = dict(r=3, lora_alpha=5, target_modules=["emb"], init_lora_weights=False)
    theirs = _peft(_Tiny(scaled), **config)
    ours = get_lora_model(_Tiny(scaled), LoraConfig(**config), seed=0)
    layer, peft_layer = ours.model.emb, theirs.base_model.model.emb
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(peft_layer.lora_embedding_A["default"])
        layer.lora_B["default"].weight.copy_(peft_layer.lora_embedding_B["default"])
    ids = torch.tensor([[0, 3, 3, 19], [5, 0, 7, 1]])
    out, peft_out = ours(ids), theirs(ids)
    close = dict(atol=1e-6, rtol=1e-5)  # fp32 rounding: the scale is applied to the r-sized lookup here
    torch.testing.assert_close(out, peft_out, **close)
    out.square().sum().backward()
    peft_out.square().sum().backward()
    grad_a = layer.lora_A["default"].weight.grad
    torch.testing.assert_close(grad_a, peft_layer.lora_embedding_A["default"].grad, **close)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, peft_layer.lora_embedding_B["default"].grad, **close)
    assert torch.all(grad_a[:, 0] == 0) and grad_a[:, 3].abs().max() > 0


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_follows_peft(init) -> None:
    """True / "gaussian": A = 0, B random, so the model starts as the base (PEFT's embedding
    init); False: both random."""
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights=init), seed=0)
    layer = model.model.model.embed_tokens
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert b.abs().max() > 0 and a.requires_grad and b.requires_grad
    assert (a.abs().max() > 0) == (init is False)
    peft_layer = _peft(tiny_llama(), target_modules=["embed_tokens"], init_lora_weights=init).base_model.model.model.embed_tokens
    assert (peft_layer.lora_embedding_A["default"].abs().max() > 0) == (init is False)
    if init is not False:
        torch.testing.assert_close(_logits(model, _ids()), _logits(tiny_llama(), _ids()), atol=0, rtol=0)


@pytest.mark.parametrize(
    "fields, match",
    [(dict(lora_bias=True), r"lora_bias=True is not supported for embedding layers \(model\.embed_tokens: Embedding\)"),
     (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported for embedding layers "
                                       r"\(model\.embed_tokens: Embedding\)"),
     (dict(init_lora_weights="eva"), r"init_lora_weights='eva' is not supported for embedding layers")],
)
def test_refused_before_anything_changes(fields, match) -> None:
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=match):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], **fields))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_peft_file_with_a_different_base_embedding_is_refused(tmp_path) -> None:
    """PEFT saves the targeted embedding's base weight with the adapter and overwrites the
    model's on load; dist_lora loads adapters only and refuses a file whose weight differs."""
    peft_model = _peft(tiny_llama(), target_modules=["embed_tokens"], init_lora_weights=False)
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ConfigError, match=rf"{EMB}\.base_layer\.weight in .*differs from the model's"):
        LoraModel.from_pretrained(model, tmp_path)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


# ---------------------------------------------------------------------------------------------
# megatron VocabParallelEmbedding

STEPS = 3
GPT = dict(num_attention_heads=8, num_query_groups=4)


def _gather_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = param.grad.detach()
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(grad, attr, getattr(param, attr))
    return gather_param(grad)


def _train(sp: bool, dora: bool) -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora,
                        target_modules=["word_embeddings", "linear_qkv"])
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, **GPT)), config, seed=0)
    layer = model.model.embedding.word_embeddings
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, grads = [], None
    for step in range(STEPS):
        loss = gpt_loss(model, *random_batch(step))
        loss.backward()
        finalize_lora_grads(model)
        grads = grads or {n: _gather_grad(p) for n, p in params.items() if ".word_embeddings." in n}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    replicated = [layer.lora_B["default"].weight] + ([layer.lora_magnitude_vector["default"].weight] if dora else [])
    return {
        "type": type(layer).__name__,
        "a_sharded": getattr(layer.lora_A["default"].weight, "partition_dim", None),
        "losses": losses,
        "grads": grads,
        "adapters": {n: gather_param(p) for n, p in params.items() if ".word_embeddings." in n},
        "replicas_equal": all(torch.equal(c, p.detach()) for p in replicated for c in all_tp_copies(p.detach())),
        "partial": {id(p) for p in tp_partial_grad_parameters(model)} >= {id(p) for p in replicated},
    }


@pytest.mark.parametrize("dora", [False, True])
def test_vocab_parallel_layouts_match_tp1(dora) -> None:
    reference = run_distributed(_train, 1, tp=1, args=(False, dora))[0]
    assert reference["type"] == "LoraVocabParallelEmbedding"
    assert reference["losses"][-1] < reference["losses"][0]
    assert len(reference["grads"]) == (3 if dora else 2)
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, f"{name}: a zero reference gradient tests nothing"
    for sp in (False, True):
        ranks = run_distributed(_train, 2, tp=2, args=(sp, dora))
        got = ranks[0]
        assert got["a_sharded"] == 1, "A must be split along the vocabulary (its dim 1)"
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5), f"SP={sp}"
        for name, want in reference["grads"].items():
            torch.testing.assert_close(got["grads"][name], want, atol=1e-5 * want.abs().max().item(), rtol=0)
        for name, want in reference["adapters"].items():
            torch.testing.assert_close(got["adapters"][name], want, atol=1e-4 * want.abs().max().item(), rtol=0)
        assert all(r["replicas_equal"] and r["partial"] for r in ranks), "B (and m) must stay identical on every rank"


def _step_counts(sp: bool, lora: bool) -> tuple[dict, dict, int]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_tiny_gpt(tiny_gpt_config(tp, sp, **GPT))
    if lora:
        model = get_lora_model(model, LoraConfig(r=4, target_modules=["word_embeddings"], init_lora_weights=False))
    else:  # the frozen base, with backward through the embedding as in the LoRA step
        model.requires_grad_(False)
        model.embedding.word_embeddings.weight.requires_grad_(True)
    with CollectiveCounter() as counter:
        gpt_loss(model, *random_batch(0)).backward()
        finalize_lora_grads(model)
    partial = sum(p.numel() * p.element_size() for p in tp_partial_grad_parameters(model))
    return dict(counter.counts), dict(counter.bytes), partial


def test_no_extra_collective_on_the_lora_path() -> None:
    def run() -> dict:
        return {(sp, lora): _step_counts(sp, lora) for sp in (False, True) for lora in (False, True)}

    results = run_distributed(run, 2, tp=2)[0]
    for sp in (False, True):
        (base, base_bytes, _), (counts, sizes, partial) = results[sp, False], results[sp, True]
        diff = Counter(counts)
        diff.subtract(base)
        assert {k: v for k, v in diff.items() if v} == {"all_reduce": 1}, f"SP={sp}: only the per-step sum"
        assert sizes["all_reduce"] - base_bytes.get("all_reduce", 0) == partial == 64 * 4 * 4  # B [hidden, r], fp32


# --- sharded save -> consolidate -> real PEFT

_LORA = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["word_embeddings", "linear_proj"])


def _megatron_run(hf_dir: str, ckpt: str, sp: bool, dora: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_megatron_gpt(hf_dir, tp=tp, sequence_parallel=sp),
                           LoraConfig(**_LORA, use_dora=dora), seed=0)
    train_lora(model, 2)
    model.eval()
    ids = _ids(MEGATRON_LLAMA["vocab_size"])
    with torch.no_grad():
        logits = gather_tp(model(ids, None, None), dim=-1)
        save_sharded(model, ckpt)
        model.merge_adapter()  # on each rank's vocabulary shard
        merged = gather_tp(model(ids, None, None), dim=-1)
    return logits, merged


def _reload_at_tp1(hf_dir: str, ckpt: str) -> torch.Tensor:
    model = get_lora_model(build_megatron_gpt(hf_dir, tp=1), LoraConfig.from_pretrained(ckpt), seed=1).eval()
    load_sharded(model, ckpt)
    with torch.no_grad():
        return model(_ids(MEGATRON_LLAMA["vocab_size"]), None, None)


@pytest.mark.parametrize("sp, dora", [(True, False), (False, True)])
def test_sharded_checkpoint_consolidates_for_peft(tmp_path, sp, dora) -> None:
    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    LlamaForCausalLM(LlamaConfig(**MEGATRON_LLAMA, tie_word_embeddings=False)).save_pretrained(hf_dir)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "adapter")
    logits, merged = run_distributed(_megatron_run, 2, tp=2, args=(hf_dir, ckpt, sp, dora))[0]
    torch.testing.assert_close(merged, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(run_distributed(_reload_at_tp1, 1, tp=1, args=(hf_dir, ckpt))[0], logits,
                               atol=1e-4, rtol=0)

    consolidate(ckpt, out, hf_model_dir=hf_dir, show_progress=False)
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert tensors[f"{EMB}.lora_embedding_A"].shape == (4, MEGATRON_LLAMA["vocab_size"])
    assert tensors[f"{EMB}.lora_embedding_B"].shape == (MEGATRON_LLAMA["hidden_size"], 4)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["target_modules"][0] == "model.embed_tokens"
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = _ids(MEGATRON_LLAMA["vocab_size"])
    assert (_logits(base, ids) - logits).abs().max() > 0.1
    peft_model = PeftModel.from_pretrained(base, out).eval()
    assert isinstance(peft_model.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    torch.testing.assert_close(_logits(peft_model, ids), logits, atol=1e-4, rtol=0)
    used = peft.utils.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert set(used) == set(tensors)

    merged_dir = merge_export(ckpt, hf_dir, tmp_path / "merged", show_progress=False)  # dist-lora merge
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), logits, atol=1e-4, rtol=0)

