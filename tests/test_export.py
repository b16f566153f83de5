"""In-memory adapter export (:mod:`dist_lora.export`): at TP=2 with sequence parallel and at
PP=2, a megatron GPT built from a tiny HF Llama with rank / alpha patterns and rsLoRA gives, on
rank 0, exactly (bit for bit) the tensors and adapter_config.json that ``dist-lora consolidate
--for vllm`` (and ``--for peft``) writes after ``save_sharded`` of the same model; bad
arguments are refused on the calling ranks before any collective (a call on one rank alone
does not hang); ranks that disagree on the arguments all fail; a call on only some ranks fails
within its timeout on every calling rank, naming the ranks that did not call it, and a rank
whose arguments are refused makes the other calling ranks fail at once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.bridges import build_megatron_gpt  # noqa: E402
from dist_lora.checkpoint.sharded import save_sharded  # noqa: E402
from dist_lora.config import ConfigError  # noqa: E402
from dist_lora.export import adapter_config, adapter_tensors  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402

LORA = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    init_lora_weights=False,  # B != 0: every factor has values
    rank_pattern={"linear_fc2": 2},
    alpha_pattern={"linear_proj": 16},
    target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
)
LAYOUTS = {"tp2_sp": (2, 1, True), "pp2": (1, 2, False)}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**MEGATRON_LLAMA, tie_word_embeddings=False)).save_pretrained(directory)
    return str(directory)


def _model(hf_dir: str, tp: int, pp: int, sp: bool):
    return get_lora_model(build_megatron_gpt(hf_dir, tp=tp, pp=pp, sequence_parallel=sp), LoraConfig(**LORA), seed=0)


def _export_and_save(hf_dir: str, ckpt: str, tp: int, pp: int, sp: bool):
    model = _model(hf_dir, tp, pp, sp)
    save_sharded(model, ckpt)
    out = {
        "peft": adapter_tensors(model, naming="peft", for_engine="peft", hf_model_dir=hf_dir),
        "vllm": adapter_tensors(model, naming="peft", for_engine="vllm", hf_model_dir=hf_dir),
        "vllm_names": adapter_tensors(model, naming="vllm", hf_model_dir=hf_dir),
        "vllm_bf16": adapter_tensors(model, naming="peft", for_engine="vllm", dtype=torch.bfloat16, hf_model_dir=hf_dir),
        "config_peft": adapter_config(model, for_engine="peft", hf_model_dir=hf_dir),
        "config_vllm": adapter_config(model, for_engine="vllm", hf_model_dir=hf_dir),
    }
    return out if dist.get_rank() == 0 else None


def _read(directory) -> tuple[dict[str, torch.Tensor], dict]:
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return load_file(os.path.join(directory, "adapter_model.safetensors")), json.load(f)


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_in_memory_export_equals_the_file_release(layout, hf_dir, tmp_path) -> None:
    tp, pp, sp = LAYOUTS[layout]
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(_export_and_save, tp * pp, tp=tp, pp=pp, args=(hf_dir, ckpt, tp, pp, sp))
    assert all(r is None for r in results[1:])
    got = results[0]
    for target, key, dtype in (("peft", "peft", None), ("vllm", "vllm", None), ("vllm", "vllm_bf16", torch.bfloat16)):
        out = tmp_path / key
        consolidate(ckpt, out, hf_model_dir=hf_dir, target=target, dtype=dtype, show_progress=False)
        tensors, config = _read(out)
        _assert_bitwise_equal(got[key], tensors)
        if dtype is None:
            assert got[f"config_{target}"] == config
    vllm, _ = _read(tmp_path / "vllm")
    _assert_bitwise_equal(got["vllm_names"], {k.removeprefix("base_model.model."): v for k, v in vllm.items()})
    assert not got["config_vllm"]["rank_pattern"] and not got["config_vllm"]["alpha_pattern"]
    assert got["config_peft"]["rank_pattern"]  # the patterns were there to fold
    down_b = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert got["peft"][down_b].shape[1] == 2 and got["vllm"][down_b].shape[1] == 4  # padded and scaled
    assert not torch.equal(got["vllm"][down_b][:, :2], got["peft"][down_b])


def _one_rank_calls(hf_dir: str, kwargs: dict):
    model = _model(hf_dir, 2, 1, False)
    if dist.get_rank() != 0:
        return None
    try:
        adapter_tensors(model, hf_model_dir=hf_dir, **kwargs)
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"naming": "hf"}, "naming must be one of"),
        ({"for_engine": "tgi"}, "must be one of"),
        ({"adapter": "other"}, "adapter 'other' is not in the model"),
        ({"dst": 5}, "dst must be a rank"),
        ({"timeout": 0}, "timeout must be a positive number of seconds"),
    ],
)
def test_bad_arguments_are_refused_before_any_collective(kwargs, match, hf_dir) -> None:
    # only rank 0 calls: an error raised after a collective would hang it (and time out)
    message = run_distributed(_one_rank_calls, 2, tp=2, timeout=60, args=(hf_dir, kwargs))[0]
    assert match in message


def _disagreeing_calls(hf_dir: str):
    model = _model(hf_dir, 2, 1, False)
    naming = "peft" if dist.get_rank() == 0 else "vllm"
    with pytest.raises(ConfigError, match="different arguments on ranks"):
        adapter_tensors(model, naming=naming, for_engine="vllm", hf_model_dir=hf_dir)


def test_ranks_with_different_arguments_all_fail(hf_dir) -> None:
    run_distributed(_disagreeing_calls, 2, tp=2, timeout=60, args=(hf_dir,))


def _export_to_rank1(hf_dir: str):
    model = _model(hf_dir, 2, 1, False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    out = adapter_tensors(model, naming="vllm", dst=1, hf_model_dir=hf_dir)
    after_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    assert after_hooks == hooks  # nothing left on the model to slow a step
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    return out


def test_export_to_another_rank_leaves_the_model_as_it_was(hf_dir) -> None:
    results = run_distributed(_export_to_rank1, 2, tp=2, timeout=60, args=(hf_dir,))
    assert results[0] is None and results[1]
    assert all(not key.startswith("base_model.model.") for key in results[1])


def _some_ranks_call(hf_dir: str, tp: int, pp: int, callers: tuple[int, ...]):
    model = _model(hf_dir, tp, pp, False)
    message = None
    if dist.get_rank() in callers:
        with pytest.raises(ConfigError, match="was not called on ranks") as error:
            adapter_tensors(model, hf_model_dir=hf_dir, timeout=3)
        message = str(error.value)
    dist.barrier()  # the process group still works afterwards (and the store's host, rank 0, stays up)
    return message


@pytest.mark.parametrize(
    "tp, pp, callers", [(2, 1, (0,)), (1, 2, (1,)), (2, 2, (0, 3))]
)
def test_a_call_on_some_ranks_fails_fast_on_each_calling_rank(tp, pp, callers, hf_dir) -> None:
    # without the handshake the callers wait in the first collective: the harness times out
    results = run_distributed(_some_ranks_call, tp * pp, tp=tp, pp=pp, timeout=60, args=(hf_dir, tp, pp, callers))
    missing = [rank for rank in range(tp * pp) if rank not in callers]
    assert all(results[rank] is None for rank in missing)
    messages = {results[rank] for rank in callers}
    assert len(messages) == 1  # the same verdict on every calling rank
    assert f"was not called on ranks {missing} within 3 s" in messages.pop()


def _one_rank_refuses(hf_dir: str):
    model = _model(hf_dir, 2, 1, False)
    if dist.get_rank() == 0:
        with pytest.raises(ConfigError, match="naming must be one of"):
            adapter_tensors(model, naming="hf", hf_model_dir=hf_dir)
    else:  # the default timeout (60 s) is the harness's: this rank must not wait for it
        with pytest.raises(ConfigError, match="refused on rank 0: naming must be one of"):
            adapter_tensors(model, naming="vllm", hf_model_dir=hf_dir)
    dist.barrier()  # rank 0 goes on: without the handshake rank 1 would wait in the export's collective


def test_a_rank_refusing_its_arguments_fails_the_other_ranks_at_once(hf_dir) -> None:
    run_distributed(_one_rank_refuses, 2, tp=2, timeout=60, args=(hf_dir,))
