"""The Hugging Face model a released adapter is for, built on the meta device from its
``config.json`` (no weights read): its modules, and the check that every written key names
one of them with the right shape (PEFT silently ignores keys that name nothing)."""

from __future__ import annotations

from typing import Optional

import torch

from ..checkpoint.peft_format import PREFIX
from ..config import ConfigError
from ..layers.base import LoraLayer
from ..layers.embedding import FACTOR_KEYS as EMBEDDING_FACTOR_KEYS
from ..replication import replicate_layers
from .errors import ConsolidationError
from .experts import A_KEY, expected_parameter_shape
from .sources import LORA_SUFFIXES, split_key
from .write import Group

HFModules = dict[str, tuple[Optional[tuple[int, int]], dict[str, tuple], bool, bool]]


def hf_modules(hf_model_dir: str, layer_replication: Optional[list] = None) -> HFModules:
    """module name -> ((in, out) for linear and embedding layers, {param: shape} in registration
    order, whether it is an embedding, whether its 3-D expert parameters are ``is_transposed``) of
    the HF model, its layers replicated as PEFT will with
    ``layer_replication``."""
    model = meta_model(hf_model_dir)
    if layer_replication:
        try:
            replicate_layers(model, layer_replication)  # structural only: the meta model stays meta
        except ConfigError as e:
            raise ConsolidationError(f"the HF model at {hf_model_dir} does not fit the checkpoint's {e}") from None
    return {name: _describe(module) for name, module in model.named_modules()}


def meta_model(hf_model_dir: str) -> torch.nn.Module:
    """The HF causal LM of ``hf_model_dir/config.json`` on the meta device (no weights read)."""
    import transformers  # heavy optional dependency, needed only with an HF model directory

    try:
        hf_config = transformers.AutoConfig.from_pretrained(hf_model_dir, local_files_only=True)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError, KeyError) as e:
        raise ConsolidationError(f"cannot build the HF model from {hf_model_dir}/config.json: {e}") from None


def _describe(module: torch.nn.Module) -> tuple[Optional[tuple[int, int]], dict[str, tuple], bool, bool]:
    params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    if isinstance(module, torch.nn.Linear):
        features = (module.in_features, module.out_features)
    elif type(module).__name__ == "Conv1D" and "weight" in params:  # GPT-2: weight is [in, out]
        features = params["weight"]
    elif isinstance(module, torch.nn.Embedding):  # in = vocabulary, out = embedding_dim
        features = (module.num_embeddings, module.embedding_dim)
    else:
        features = None
    return features, params, isinstance(module, torch.nn.Embedding), bool(getattr(module, "is_transposed", False))


def check_against_hf_model(groups: list[Group], hf_model_dir: str, layer_replication: Optional[list] = None) -> None:
    """Every output key must name a module (and parameter) of the HF model (its layers
    replicated as PEFT will, with ``layer_replication``), with its shape."""
    modules = hf_modules(hf_model_dir, layer_replication)
    for _, outputs in groups:
        for out in outputs:
            if out.parameter is not None:
                want = _expected_parameter_shape(out.name, out.shape, out.parameter, modules, hf_model_dir)
            else:
                want = _expected_shape(out.name, out.shape, modules, hf_model_dir)
            if tuple(out.shape) != tuple(want):
                module = split_key(out.name.removeprefix(PREFIX))[0]
                raise ConsolidationError(
                    f"{out.name} has shape {list(out.shape)}, but HF module {module} needs {list(want)}."
                )


def _expected_shape(name: str, shape: tuple[int, ...], modules: HFModules, hf_model_dir: str) -> tuple[int, ...]:
    """The shape the HF module named by output key ``name`` needs for it (its rank from ``shape``)."""
    module, suffix = split_key(name.removeprefix(PREFIX))
    if module not in modules:
        raise ConsolidationError(
            f"{name} names no module of the HF model at {hf_model_dir} ({module!r}); PEFT would "
            "silently ignore it. Is this the model the adapter was trained on?"
        )
    features, params, embedding, _ = modules[module]
    if suffix not in LORA_SUFFIXES:
        if suffix not in params:
            raise ConsolidationError(f"{name}: HF module {module} has no parameter {suffix!r}.")
        return params[suffix]
    if features is None:
        raise ConsolidationError(f"{name}: HF module {module} is not a linear or embedding layer.")
    if suffix in (*LoraLayer.factor_keys, *EMBEDDING_FACTOR_KEYS) and embedding != (suffix in EMBEDDING_FACTOR_KEYS):
        raise ConsolidationError(
            f"{name}: HF module {module} is {'an embedding' if embedding else 'a linear layer'}; PEFT "
            f"names its factors {EMBEDDING_FACTOR_KEYS if embedding else LoraLayer.factor_keys}."
        )
    n_in, n_out = features
    return {
        "lora_A.weight": (shape[0], n_in),
        "lora_B.weight": (n_out, shape[-1]),
        "lora_embedding_A": (shape[0], n_in),
        "lora_embedding_B": (n_out, shape[-1]),
        "lora_B.bias": (n_out,),
        "lora_magnitude_vector": (n_out,),
    }[suffix]


def _expected_parameter_shape(name: str, shape: tuple[int, ...], parameter: str, modules: HFModules,
                              hf_model_dir: str) -> tuple[int, ...]:
    """The shape of output ``name``, the lora_A / lora_B of PEFT's adapter on ``parameter`` (a
    full HF parameter name: target_parameters), its stacked rank r·E taken from ``shape``."""
    module, short = parameter.rsplit(".", 1)
    found = modules.get(module)
    want = None if found is None else expected_parameter_shape(
        split_key(name.removeprefix(PREFIX))[1], shape[0] if name.endswith(A_KEY) else shape[-1], found[1], parameter,
        found[3])
    if want is None:
        raise ConsolidationError(
            f"{name} adapts {parameter}, which is no parameter of the HF model at {hf_model_dir}; PEFT would "
            "refuse or ignore it. Is this the model the adapter was trained on?"
        )
    return want
