"""The ``--for vllm`` release checked against vLLM's OWN adapter code (not our reading of it).

vLLM (installed without its dependencies into a side directory by launch/setup_vllm_side.sh, or
``DIST_LORA_VLLM_SIDE=1 bash launch/setup_env.sh``; ``DIST_LORA_VLLM_SIDE_DIR`` names it,
default ``.venv-side/vllm``) is run in one subprocess
(tests/vllm_probe.py): ``PEFTHelper.from_local_dir`` + ``validate_legal(LoRAConfig(max_lora_rank))``
+ ``LoRAModel.from_local_checkpoint(device="cpu")``, then per module ``scaling · lora_b @ lora_a``.
Checked here: it accepts every folded release at the ``max_lora_rank`` we report (and not at the
choice below), and its per-module delta equals ours (``s_module · B A`` of the ``--for peft``
release, 1e-6); what we refuse for vLLM it refuses too. Skipped (with the reason) when the side
directory is missing or vLLM does not import from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dist_lora.checkpoint.peft_format import PREFIX, WEIGHTS_NAME, read_adapter_file
from dist_lora.cli import main as cli_main
from dist_lora.config import LoraConfig
from dist_lora.layers.math import delta_weight
from dist_lora.release.consolidate import consolidate
from dist_lora.release.inspect import inspect_adapter
from dist_lora.release.serving import ENGINES, MAX_LORA_RANKS, module_ranks, module_scalings, write_for_engine
from dist_lora.release.sources import split_key
from tests.vllm_probe import IMPORT_FAILED
from tests.test_serving import CASES, TARGETS, _checkpoint, hf_dir  # noqa: F401  (hf_dir: fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = os.path.join(ROOT, os.environ.get("DIST_LORA_VLLM_SIDE_DIR", os.path.join(".venv-side", "vllm")))
PROBE = os.path.join(ROOT, "tests", "vllm_probe.py")
QKV = dict(target_modules=["q_proj", "k_proj", "v_proj"], r=4, lora_alpha=8,
           rank_pattern={"k_proj": 2, "model.layers.1.self_attn.v_proj": 6}, alpha_pattern={"v_proj": 3})
# What we refuse for vLLM (tests/test_serving.py checks our messages), as edits of a PEFT release.
REFUSED = {
    "dora": dict(use_dora=True),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "lora_bias": dict(lora_bias=True),
    "bias": dict(bias="all"),
    "layer_replication": dict(layer_replication=[[0, 2], [0, 2]]),
    "loftq": dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
    "pissa": dict(init_lora_weights="pissa"),  # unconverted (PEFT's own file; ours are converted)
    "olora": dict(init_lora_weights="olora"),
    "corda": dict(init_lora_weights="corda", corda_config={}),
}


def _ours(adapter_dir: str) -> dict[str, torch.Tensor]:
    """dist_lora's delta per module (``s_module · B A``, fp32) of a PEFT release with patterns."""
    tensors = read_adapter_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    config = LoraConfig.from_pretrained(adapter_dir)
    scalings = module_scalings(config, module_ranks(tensors))
    out = {}
    for key, a in tensors.items():
        module, suffix = split_key(key.removeprefix(PREFIX))
        if suffix == "lora_A.weight":
            out[module] = delta_weight(a, tensors[f"{PREFIX}{module}.lora_B.weight"], scalings[module])
    return out


def _max_lora_rank(adapter_dir: str) -> int:
    return inspect_adapter(adapter_dir, "vllm").max_lora_rank or MAX_LORA_RANKS[-1]


def _with_config(src: str, dst, **changes) -> str:
    dst = shutil.copytree(src, str(dst))
    path = os.path.join(dst, "adapter_config.json")
    json.dump({**json.load(open(path)), **changes}, open(path, "w"))
    return dst


@pytest.fixture(scope="module")
def served(hf_dir, tmp_path_factory) -> dict:  # noqa: F811
    """Every release of this file, and what vLLM's code made of each (one subprocess)."""
    if not os.path.isfile(os.path.join(SIDE, "vllm", "lora", "peft_helper.py")):
        pytest.skip(f"no vLLM side install in {SIDE} (bash launch/setup_vllm_side.sh installs it)")
    root = tmp_path_factory.mktemp("serving_vllm")
    releases, adapters = {}, {}
    for case, lora in CASES.items():
        ckpt = _checkpoint(hf_dir, root / f"ckpt_{case}", lora)
        peft_out = consolidate(ckpt, root / f"peft_{case}", hf_model_dir=hf_dir, show_progress=False)
        vllm_out = str(root / f"vllm_{case}")
        assert cli_main(["consolidate", ckpt, vllm_out, "--hf-model", hf_dir, "--for", "vllm", "--no-progress"]) == 0
        releases[case] = (peft_out, vllm_out)
    torch.manual_seed(0)  # a real PEFT q/k/v adapter with patterns, released for vLLM from its directory
    qkv = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                              peft.LoraConfig(init_lora_weights=False, **QKV))
    qkv.save_pretrained(root / "peft_qkv")
    write_for_engine(str(root / "peft_qkv"), str(root / "vllm_qkv"), ENGINES["vllm"])
    releases["qkv"] = (str(root / "peft_qkv"), str(root / "vllm_qkv"))
    for case, (peft_out, vllm_out) in releases.items():
        rank = _max_lora_rank(vllm_out)
        adapters[f"{case}.vllm"] = (vllm_out, rank)
        adapters[f"{case}.peft"] = (peft_out, _max_lora_rank(peft_out))
        adapters[f"{case}.vllm_rank_below"] = (vllm_out, MAX_LORA_RANKS[MAX_LORA_RANKS.index(rank) - 1])
    plain = releases["patterns"][1]
    for name, change in REFUSED.items():
        adapters[f"refused.{name}"] = (_with_config(plain, root / f"refused_{name}", **change), 16)
    out = root / "probe"
    out.mkdir()
    request = {"targets": sorted({t for t in TARGETS + QKV["target_modules"]}),
               "adapters": {k: list(v) for k, v in adapters.items()}}
    json.dump(request, open(out / "request.json", "w"))
    done = subprocess.run([sys.executable, PROBE, SIDE, str(out / "request.json"), str(out)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode == IMPORT_FAILED:
        pytest.skip(f"{done.stderr.strip().splitlines()[-1]} (from {SIDE})")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.load(open(out / "result.json"))
    files = {name: out / f"{name}.safetensors" for name in adapters}
    deltas = {name: load_file(path) for name, path in files.items() if path.exists()}
    return {"releases": releases, "adapters": adapters, "vllm": result, "deltas": deltas}


@pytest.mark.parametrize("case", [*CASES, "qkv"])
def test_vllm_accepts_the_release_and_applies_our_delta(case, served) -> None:
    result = served["vllm"]["adapters"]
    peft_out, _ = served["releases"][case]
    assert result[f"{case}.vllm"]["error"] is None
    ours, theirs = _ours(peft_out), served["deltas"][f"{case}.vllm"]
    assert set(theirs) == set(ours) and len(ours) >= 4
    for module, delta in ours.items():
        torch.testing.assert_close(theirs[module], delta.double(), atol=1e-6, rtol=0, msg=module)
    # the max_lora_rank we report is the least vLLM takes
    assert "is greater than max_lora_rank" in result[f"{case}.vllm_rank_below"]["error"]


@pytest.mark.parametrize("case", [*CASES, "qkv"])
def test_vllm_on_the_unfolded_peft_release(case, served) -> None:
    """The ``--for peft`` release (with patterns): vLLM >= 0.32 resolves ``rank_pattern`` /
    ``alpha_pattern`` per module (PEFT's suffix rule) and serves it as trained; vLLM <= 0.31
    applies one ``lora_alpha / r`` to every module and serves some module wrong (the point of the
    fold, which both serve right). Which one runs here decides what is asserted."""
    result = served["vllm"]["adapters"][f"{case}.peft"]
    assert result["error"] is None
    ours, theirs = _ours(served["releases"][case][0]), served["deltas"][f"{case}.peft"]
    wrong = [m for m, delta in ours.items() if not torch.allclose(theirs[m], delta.double(), atol=1e-6, rtol=0)]
    assert wrong == [] if served["vllm"]["patterns"] else wrong, served["vllm"]["vllm"]
    config = LoraConfig.from_pretrained(served["releases"][case][0])  # one scaling alone is wrong somewhere
    assert len(set(module_scalings(config, {m: config.rank_for(m) for m in ours}).values())) > 1


@pytest.mark.parametrize("name", list(REFUSED))
def test_vllm_refuses_what_we_refuse(name, served) -> None:
    """vLLM 0.34 (the pinned side install) refuses each; vLLM 0.31 loaded lora_bias,
    layer_replication and the base-rewriting inits without a word (then served wrong numbers)."""
    adapter_dir, _ = served["adapters"][f"refused.{name}"]
    assert inspect_adapter(adapter_dir, "vllm").problems  # ours
    version = tuple(int(p) for p in served["vllm"]["vllm"].split(".")[:2])
    if version < (0, 34):
        pytest.skip(f"vLLM {served['vllm']['vllm']}: only 0.34's refusals are checked")
    assert served["vllm"]["adapters"][f"refused.{name}"]["error"]  # vLLM's
