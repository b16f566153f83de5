"""PEFT's ``PeftModel``-level methods of :class:`dist_lora.model.LoraModel` (mixed into it).

LoraModel plays both of PEFT's roles, ``PeftModel`` and its tuner: :class:`PeftModelApi` gives
it ``base_model`` / ``get_base_model`` / ``active_peft_config``, ``disable_adapter``, the status
reports, the adapter state dict and files (``save_pretrained``, ``load_adapter``; ``from_pretrained``
is on LoraModel). PEFT's module-level functions are in :mod:`dist_lora.peft_api`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import nn

from .checkpoint.conversion import converted_config, mutated_to_plain
from .checkpoint.peft_format import (
    WEIGHTS_NAME,
    IncompatibleKeys,
    PeftWrapper,
    adapter_state_dict,
    load_adapter,
    read_adapter_file,
    save_adapter,
)
from .config import ConfigError, LoraConfig
from .peft_status import LayerStatus, ModelStatus, adapters_enabled, get_layer_status, get_model_status

if TYPE_CHECKING:
    from .model import LoraModel


class PeftModelApi(PeftWrapper):
    """PEFT's ``PeftModel`` names on :class:`dist_lora.model.LoraModel` (mixed into it)."""

    @property
    def base_model(self) -> "LoraModel":
        """PEFT's ``PeftModel.base_model`` (its tuner): the LoraModel itself, so that
        ``peft_model.base_model.model`` is the wrapped model as in PEFT."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoRA layers), as PEFT's ``get_base_model``."""
        return self.model

    @property
    def active_peft_config(self) -> LoraConfig:
        """The active adapter's config (one adapter must be active)."""
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"active_peft_config needs exactly one active adapter, {active} are active.")
        return self.peft_config[active[0]]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the base model. On exit the adapters are
        enabled again unless they were all disabled before (PEFT's rule; a model with some
        layers enabled and some not, which PEFT warns about, comes back all enabled)."""
        was_enabled = adapters_enabled(self)
        if was_enabled == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is "
                "most likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if was_enabled is not False:
                self.enable_adapter_layers()

    def get_layer_status(self) -> list[LayerStatus]:
        """Each adapter layer's state (PEFT's ``get_layer_status``; this rank's layers)."""
        return get_layer_status(self)

    def get_model_status(self) -> ModelStatus:
        """The adapters' state over all layers (PEFT's ``get_model_status``; this rank's part)."""
        return get_model_status(self)

    # --- parameters ----------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts of this rank's part of the model."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- state dicts and files -----------------------------------------------------------

    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """This rank's adapter tensors under PEFT's saved names
        (``base_model.model.<module>.lora_A.weight``, no adapter name)."""
        return adapter_state_dict(self, adapter_name or self.active_adapters[0])

    def subtract_mutated_init(
        self, output_state_dict: dict[str, torch.Tensor], adapter_name: str, kwargs: Optional[dict] = None
    ) -> dict[str, torch.Tensor]:
        """Turn a trained PiSSA/OLoRA/CorDA adapter into a plain LoRA adapter for the ORIGINAL
        base (PEFT's ``LoraModel.subtract_mutated_init``): A' = [A; A0], B' = [B, -B0] (see
        :mod:`dist_lora.checkpoint.conversion`).

        ``output_state_dict`` holds the trained adapter (this rank's tensors under PEFT's saved
        names, as :meth:`adapter_state_dict` gives them); ``adapter_name`` is an adapter of this
        model holding the factors A0, B0 as they were at initialisation. Non-factor entries are
        dropped, as PEFT does. Works shard-wise under TP. Save the result with
        :func:`dist_lora.checkpoint.conversion.converted_config`."""
        del kwargs  # PEFT's ``state_dict`` override; this model's adapters are read directly
        return mutated_to_plain(output_state_dict, self.adapter_state_dict(adapter_name), keep_others=False)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        path_initial_model_for_weight_conversion: Optional[str | os.PathLike] = None,
    ) -> None:
        """Write PEFT's adapter files (``adapter_config.json`` + ``adapter_model.safetensors``);
        adapters other than ``default`` go into ``<dir>/<adapter_name>/`` as in PEFT.

        ``safe_serialization``: safetensors only; False (PEFT's pickled ``adapter_model.bin``)
        is refused. ``selected_adapters``: the adapters to save (default: all), all checked
        before anything is written. ``path_initial_model_for_weight_conversion``: the directory
        this PiSSA/OLoRA/CorDA adapter was saved to before training; the adapter is then written
        as a plain LoRA adapter of twice the rank that applies to the original base model
        (:mod:`dist_lora.checkpoint.conversion`)."""
        if safe_serialization is not True:
            raise ConfigError(
                f"save_pretrained(safe_serialization={safe_serialization!r}): dist_lora writes safetensors only "
                "(adapter_model.safetensors, which PEFT and transformers load), never pickled adapter_model.bin "
                "files. Leave safe_serialization at True."
            )
        initial_dir = path_initial_model_for_weight_conversion
        convert = None if initial_dir is None else _to_plain_lora(os.fspath(initial_dir))
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} are not adapters of this model; existing: {sorted(self.peft_config)}."
            )
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self, directory, name, convert=convert)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> IncompatibleKeys:
        """Load a PEFT adapter directory as ``adapter_name`` (sliced to this rank's shards); it is
        not activated. As PEFT: ``is_trainable=False`` loads it frozen and puts the model in
        eval mode; a PiSSA/OLoRA/LoftQ adapter's init is redone first (the base weight becomes
        what it was trained on). Returns PEFT's ``(missing_keys, unexpected_keys)``, always
        empty (such files are refused). The model is unchanged if anything fails. See
        :func:`dist_lora.checkpoint.peft_format.load_adapter`."""
        return load_adapter(
            self, model_id, adapter_name, is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
        )


def _to_plain_lora(initial_dir: str) -> Callable[[LoraConfig, dict], tuple[LoraConfig, dict]]:
    """``save_adapter``'s ``convert`` for ``path_initial_model_for_weight_conversion``: a trained
    PiSSA/OLoRA/CorDA adapter as plain LoRA for the original base, from the adapter as saved in
    ``initial_dir`` before training (:mod:`dist_lora.checkpoint.conversion`)."""

    def convert(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        config = converted_config(config)
        initial = read_adapter_file(os.path.join(initial_dir, WEIGHTS_NAME))
        return config, {k: v.contiguous() for k, v in mutated_to_plain(tensors, initial).items()}

    return convert
