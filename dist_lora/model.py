"""LoraModel: inject adapters into a model, manage their lifecycle, merge and unload.

The public surface follows PEFT's LoraModel/PeftModel name for name (add_adapter, set_adapter,
delete_adapter, enable/disable_adapter_layers, merge_and_unload, unload, from_pretrained, ...;
the other PeftModel-level names, e.g. save_pretrained, load_adapter, disable_adapter and the
status reports, come from :class:`dist_lora.peft_methods.PeftModelApi`). It works the same on a
plain Hugging Face model and on a megatron-core model with tensor/sequence parallelism.

A call that fails hands the model back exactly as it was (:meth:`LoraModel.rollback_on_error`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint.peft_format import load_adapter
from .config import LoraConfig
from .injection import (
    check_new_adapter,
    extend_unique,
    inject,
    modules_to_save_names,
    plan_targets,
    shared_seed,
    trainable_biases,
    wrap_modules_to_save,
)
from .layers import LoraLayer
from .layers.embedding import check_embedding_targets
from .layers.init_checks import check_init_targets
from .merge import merge_layers, refuse_replicated_layers
from .modules_to_save import ModulesToSaveWrapper
from .parallel.zero import gathered
from .peft_methods import PeftModelApi
from .replication import Replication, materialize, replicate_for_adapter
from .rollback import ModelSnapshot
from .weighting import add_weighted_adapter


class LoraModel(PeftModelApi, nn.Module):
    """A model with LoRA adapters. ``self.model`` is the wrapped model (modified in place).

    It plays both of PEFT's roles, ``PeftModel`` and its tuner ``LoraModel``: ``base_model``
    is the LoraModel itself, so PEFT code such as ``peft_model.base_model.model`` reaches the
    wrapped model as in PEFT.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        seed: Optional[int] = None,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self._attach(model, adapter_name, seed)
        with self.rollback_on_error():  # a refused adapter leaves the caller's model untouched (unfrozen too)
            self._freeze_base()
            self.add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype)

    def _attach(self, model: nn.Module, adapter_name: str, seed: Optional[int]) -> None:
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active_adapters: list[str] = [adapter_name]
        self._seed = shared_seed(seed)  # read through adapter_seed
        self._replication: Optional[Replication] = None  # set by the first adapter with layer_replication
        self.targeted_module_names: list[str] = []  # as PEFT: every adapter's targets, first seen first
        self.targeted_parameter_names: list[str] = []  # as PEFT: every adapter's target_parameters matches
        self._snapshots: list[ModelSnapshot] = []  # one per open rollback_on_error block
        self._structure_lock: Optional[str] = None  # set by lock_structure (e.g. FSDP2 sharding)

    def lock_structure(self, reason: str) -> None:
        """From now on refuse what adds, removes or merges adapter parameters (``add_adapter``,
        ``load_adapter``, ``delete_adapter``, merging): ``reason`` says why (e.g. the parameters
        were sharded by FSDP2, which only knows the parameters present when it sharded)."""
        self._structure_lock = reason

    def check_structure_unlocked(self, action: str) -> None:
        """Raise if :meth:`lock_structure` was called, naming ``action`` and the reason."""
        reason = getattr(self, "_structure_lock", None)
        if reason is not None:
            raise RuntimeError(f"cannot {action}: {reason}.")

    @classmethod
    def _without_adapter(cls, model: nn.Module, adapter_name: str, seed: Optional[int]) -> "LoraModel":
        """A LoraModel around ``model`` whose first adapter is still to be added (loaded)."""
        lora_model = cls.__new__(cls)
        nn.Module.__init__(lora_model)
        lora_model._attach(model, adapter_name, seed)
        return lora_model

    def _freeze_base(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)

    @contextlib.contextmanager
    def rollback_on_error(self) -> Iterator[None]:
        """Undo everything done to the model and to this LoraModel inside the block if it raises:
        adapters added or loaded, modules wrapped, parameters frozen, base weights rewritten
        (PiSSA/OLoRA/CorDA/LoftQ; copied to host memory meanwhile), layers replicated, configs
        and active adapters (see :mod:`dist_lora.rollback`). Blocks nest. Under tensor/pipeline
        parallelism every rank must fail together (as every rank runs the same collectives)."""
        snapshot = ModelSnapshot(self.model)
        configs, active = dict(self.peft_config), list(self._active_adapters)
        replication, targeted = self._replication, list(self.targeted_module_names)
        targeted_parameters = list(self.targeted_parameter_names)
        self._snapshots.append(snapshot)
        try:
            yield
        except BaseException:
            if self._replication is not replication:
                self._unreplicate()  # layer indices and config; the module tree comes back below
            snapshot.restore()
            self.peft_config.clear()
            self.peft_config.update(configs)
            self._active_adapters, self._replication, self.targeted_module_names = active, replication, targeted
            self.targeted_parameter_names = targeted_parameters
            raise
        finally:
            self._snapshots.pop()

    def keep_weight(self, param: torch.Tensor) -> None:
        """``param`` is about to be rewritten: every open :meth:`rollback_on_error` block records
        it (one host copy), so a failure puts it back exactly."""
        copy = None
        for snapshot in self._snapshots:
            kept = snapshot.keep_weight(param, copy)
            copy = copy if kept is None else kept

    # --- attribute passthrough -----------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- adapters ------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self._active_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def adapter_seed(self) -> int:
        """The seed every adapter init derives from (per module and adapter: :func:`dist_lora.layers.math.init_seed`),
        the same on every rank."""
        return self._seed

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Inject adapter ``adapter_name`` into every module ``config`` targets (it is not
        activated unless it is the first).

        Everything the config decides is checked before the model changes, and if anything
        fails on the way the model is handed back exactly as it was (:meth:`rollback_on_error`).
        ``autocast_adapter_dtype`` (PEFT's): adapters of a float16/bfloat16 base are kept in
        float32; False keeps them in the base weight's dtype.
        """
        self.check_structure_unlocked(f"add adapter {adapter_name!r}")
        check_new_adapter(self.peft_config, adapter_name, config)
        config = copy.deepcopy(config)  # never mutate the caller's config
        with self.rollback_on_error():  # layer_replication: expand the stack before targeting
            self._replication = replicate_for_adapter(
                self.model, self._replication, config.layer_replication, list(self.peft_config)
            )
            targets = plan_targets(self.model, adapter_name, config, self._seed)
            module_names = [t.name for t in targets if t.parameter is None]
            check_embedding_targets(self.model, module_names, config)  # lora_bias / inits embeddings cannot take
            save_names = modules_to_save_names(self.model, config)
            if not low_cpu_mem_usage:  # PiSSA/OLoRA/CorDA/LoftQ rewrite base weights: refuse before the first
                check_init_targets(self.model, module_names, config)
            inject(self, adapter_name, config, targets, low_cpu_mem_usage, autocast_adapter_dtype)
            wrap_modules_to_save(self, save_names, adapter_name)
            self.peft_config[adapter_name] = config
            extend_unique(self.targeted_module_names, module_names)
            extend_unique(self.targeted_parameter_names, (f"{t.name}.{t.parameter}" for t in targets if t.parameter))
            self.mark_trainable()

    def _unreplicate(self) -> None:
        if self._replication is not None:
            self._replication.restore(self.model)
            self._replication = None

    def materialize_replicated_layers(self) -> int:
        """Give every replicated layer its own copy of the base weights it shares (copied on
        purpose: the model becomes a dense expanded model whose adapters can be merged).
        Returns the bytes copied (0 without layer_replication)."""
        return materialize(self.model, self._replication)

    def replace_module(self, name: str, new: nn.Module) -> None:
        """Put ``new`` at the dotted module path ``name`` of the wrapped model (a LoRA layer for its
        base, or back); the hook other packages use to change the module tree."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate adapter(s); active adapters become trainable, the others frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; existing: {sorted(self.peft_config)}.")
        self._active_adapters = names
        for _, layer in self.lora_layers():
            layer.set_adapter(names)
        for wrapper in self._wrappers():
            wrapper.set_adapter(names)
        self.mark_trainable()

    def mark_trainable(self) -> None:
        """Set ``requires_grad`` from the configs: adapters of active, non-inference configs train,
        everything else is frozen; biases per ``config.bias``."""
        active = [n for n in self._active_adapters if n in self.peft_config]
        frozen = [n for n in active if self.peft_config[n].inference_mode]
        for _, layer in self.lora_layers():
            layer.set_adapter(active)
            for name in frozen:
                for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                    if name in store:
                        store[name].requires_grad_(False)
        for wrapper in self._wrappers():
            wrapper.set_adapter(active)
        for name in active:
            config = self.peft_config[name]
            for bias in [] if config.inference_mode else trainable_biases(self.model, config.bias):
                bias.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_structure_unlocked(f"delete adapter {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; existing: {sorted(self.peft_config)}.")
        for _, layer in self.lora_layers():
            layer.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            wrapper.delete(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    # PEFT's add_weighted_adapter (on sharded adapters too; ``seed`` seeds DARE's masks): the
    # function of :mod:`dist_lora.weighting`, bound as a method (its first argument is the model).
    add_weighted_adapter = add_weighted_adapter

    def discard_adapter(self, adapter_name: str) -> None:
        """Undo a failed load: delete the adapter and unwrap the layers left with no adapter,
        so the module tree (and state-dict keys) are as before."""
        self.delete_adapter(adapter_name)
        for name, layer in reversed(list(self.lora_layers())):  # nested parameter wrappers: innermost first
            if not layer.lora_A:
                self.replace_module(name, layer.base_layer)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
                self.replace_module(name, module.original_module)
        if not self.peft_config:
            self._unreplicate()

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """The model computes the base model's function (bias='all'/'lora_only' changes stay)."""
        self._set_enabled(False)

    def _set_enabled(self, enabled: bool) -> None:
        for _, layer in self.lora_layers():
            if enabled or not layer.merged_adapters:
                layer.enable_adapters(enabled)
                continue
            with gathered(layer.parameters(), modifier_rank=0):  # disabling unmerges (ZeRO-3: gathered)
                layer.enable_adapters(enabled)
        for wrapper in self._wrappers():
            wrapper.disabled = not enabled

    # --- merging -------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights in place, on each
        rank's own shards; see :mod:`dist_lora.merge` (safe_merge is all-or-nothing on all ranks)."""
        self._check_merge_allowed()
        merge_layers(list(self.lora_layers()), adapter_names, self._active_adapters, safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            with gathered(layer.parameters(), modifier_rank=0):  # ZeRO-3 (else a no-op)
                layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        materialize: bool = False,
    ) -> nn.Module:
        """Merge adapters into the base weights and return the base model without LoRA modules.

        With ``safe_merge`` every merged weight is checked finite before any weight changes.
        ``materialize`` (layer_replication only) first copies the shared base weights
        (:meth:`materialize_replicated_layers`): the result is a dense expanded model.
        """
        if materialize:
            self.materialize_replicated_layers()
        self._check_merge_allowed()
        progress = lambda items: _progress(items, progressbar, "merging")  # noqa: E731
        merge_layers(list(self.lora_layers()), adapter_names, self._active_adapters, safe_merge, progress)
        return self.unload()

    def _check_merge_allowed(self) -> None:
        """Replicated layers share base weights: merging is refused until they are materialized."""
        self.check_structure_unlocked("merge adapters into the base weights")
        if self._replication is not None:
            self._replication.refuse_merge_unless_materialized()
        else:
            refuse_replicated_layers(self.peft_config.values())

    def unload(self) -> nn.Module:
        """The base model with every LoRA layer replaced by its base layer (no merge)."""
        for name, layer in reversed(list(self.lora_layers())):  # nested parameter wrappers: innermost first
            self.replace_module(name, layer.base_layer)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                active = module.active_adapter
                self.replace_module(name, module.modules_to_save[active] if active else module.original_module)
        return self.model

    # --- loading (saving and the other PeftModel-level names: :mod:`dist_lora.peft_methods`) -----

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[LoraConfig] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        seed: Optional[int] = None,
    ) -> "LoraModel":
        """Wrap ``model`` and load the PEFT adapter in ``model_id`` (PeftModel.from_pretrained's
        role): frozen and in eval mode unless ``is_trainable``. ``config`` replaces the
        directory's adapter_config.json (it is copied, not changed). ``seed`` matters only for
        ``pissa_niter_<N>`` adapters, whose randomised init is redone with it. If anything
        fails, ``model`` is handed back exactly as it was."""
        lora_model = cls._without_adapter(model, adapter_name, seed)
        with lora_model.rollback_on_error():
            lora_model._freeze_base()
            load_adapter(
                lora_model, model_id, adapter_name, is_trainable=is_trainable, config=config,
                autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            )
        return lora_model


def get_lora_model(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    seed: Optional[int] = None,
    autocast_adapter_dtype: bool = True,
) -> LoraModel:
    """Freeze ``model`` and add LoRA adapter ``adapter_name`` as ``config`` describes. If the
    config is refused, ``model`` is handed back exactly as it was.

    Adapter initialisation is layout-independent: each factor is drawn in full from a seed
    derived from ``seed`` (default ``torch.initial_seed()``, taken from rank 0) and the
    module's global name, then sliced to this rank's shard.
    """
    return LoraModel(model, config, adapter_name, low_cpu_mem_usage, seed, autocast_adapter_dtype)


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    return tqdm(items, desc=desc)
