"""The SpaRTA tuner: injects SpaRTA layers, routes, adds tasks and adds its regularizers to the model's loss."""

from __future__ import annotations

import copy
import math
import weakref
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    ModulesToSaveWrapper,
    get_quantization_kwargs,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import (
    add_missing_query_spread,
    check_checkpoint,
    check_task_count,
    current_key,
    drop_per_layer_router_copies,
    split_pooled_query_spread,
)
from .config import SpaRTAConfig
from .export import export_lora
from .layer import Linear, SpaRTALayer, iter_sparta_layers, sparta_layers
from .optimizer_guard import guard_optimizers_of
from .quantization import quantization_backend
from .restoration import RestorePoint, count_optimizer_steps_of, restore, take_restore_point
from .routers import Router, RoutingContext
from .routers.context import CACHED_DECISIONS, CACHED_EMBEDDING_SUMS, CACHED_QUERY, CACHED_SUMS, kv_cache


#: Every SpaRTA tuner alive in this process (to tell whether a config object is shared between models).
_LIVE_TUNERS: weakref.WeakSet = weakref.WeakSet()

#: The layer containers of the branches, whose trainable entries stochastic restoration resets.
BRANCH_CONTAINERS = ("sparta_A_shared", "sparta_B_shared", "sparta_A_task", "sparta_B_task")

#: Config fields that decide the adapter's tensors or how they combine, fixed once the layers are built: changed on
#: the config afterwards, they would be saved with weights they do not describe.
STRUCTURAL_FIELDS = (
    "r_shared",
    "r_task",
    "alpha_shared",
    "alpha_task",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "router",
    "router_granularity",
    "router_dim",
    "router_prototypes",
    "router_components",
    "task_branches",
    "modules_to_save",
    "bias",
    "task_names",
)


class SpaRTAModel(BaseTuner):
    """
    Creates a SpaRTA model from a pretrained transformers model.

    Every targeted linear layer gets a shared low-rank branch, one high-rank branch per task (or one for all tasks with
    ``task_branches="shared"``, the paper design) and a router; see [`SpaRTAConfig`]. The model adds and removes tasks
    (`add_task`, `remove_task`), forces or releases routing (`set_task`), restores entries stochastically when
    configured (`restore_stochastically`, `peft_sparta.restoration`), and in training mode attaches its regularizers to
    each adapted layer's output (see
    `peft_sparta.regularizers`), so that whatever loss a trainer computes from the outputs trains them too;
    `outputs.loss` is the task loss alone and `last_regularization` holds the regularizers' values.

    Args:
        model ([`torch.nn.Module`]): The model to be adapted.
        config ([`SpaRTAConfig`]): The configuration of the SpaRTA model.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`, *optional*, defaults to `False`):
            Create empty adapter weights on meta device. Useful to speed up the loading process.

    Example:

        ```py
        >>> import peft_sparta
        >>> from peft import get_peft_model
        >>> from peft_sparta import SpaRTAConfig

        >>> config = SpaRTAConfig(r_shared=8, r_task=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        >>> model = get_peft_model(base_model, config)  # one task branch, "task_0"
        >>> model.add_task("summarize")  # freezes task_0, adds a new branch
        ```
    """

    prefix: str = "sparta_"
    tuner_layer_cls = SpaRTALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.routing_context = RoutingContext()
        self.last_regularization: dict[str, torch.Tensor] = {}
        self._hook_handles: list = []
        self._restore_points: dict[str, RestorePoint] = {}
        self._built_with: dict[str, dict] = {}
        #: parameters dropped by remove_task, by which `optimizer_guard` knows the optimizers built before it
        self.removed_parameters: weakref.WeakSet = weakref.WeakSet()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- injection ---------------------------------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._sequence_owners: dict[str, Router] = {}  # a plain dict: the owner is its layer's submodule, not ours
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._sequence_owners = {}
        self._record_structure(adapter_name)
        _LIVE_TUNERS.add(self)
        guard_optimizers_of(self)

    def _record_structure(self, adapter_name: str) -> None:
        """Keep the `STRUCTURAL_FIELDS` the adapter's layers were built with (see `check_config_matches_layers`)."""
        config = self.peft_config[adapter_name]
        self._built_with[adapter_name] = {name: copy.deepcopy(getattr(config, name)) for name in STRUCTURAL_FIELDS}

    def check_config_matches_layers(self, adapter_name: str) -> None:
        """Raise a ValueError, before anything is saved, when the adapter's config no longer describes its layers: a
        structural field (rank, targets, router, task list, ...) was changed on the config after the model was built,
        or holds an invalid value. Such a config would be saved with weights that it cannot load."""
        config = self.peft_config[adapter_name]
        config._validate()
        built = self._built_with.get(adapter_name, {})
        for name, value in built.items():
            if getattr(config, name) != value:
                how = "add_task / remove_task" if name == "task_names" else "a new model (get_peft_model)"
                raise ValueError(
                    f"Adapter '{adapter_name}': {name} was changed on its config to {getattr(config, name)!r} after "
                    f"the model was built with {value!r}, which its layers and weights still have; saving would write "
                    f"an adapter that cannot be loaded. Set it back to {value!r}; to change it, use {how}."
                )

    def _own_config(self, adapter_name: str) -> SpaRTAConfig:
        """The adapter's config, copied first if another live model holds the same object (one config passed to two
        `get_peft_model` calls), so that changing this model's tasks leaves the other model as it is."""
        config = self.peft_config[adapter_name]
        shared = any(
            other is not self and any(held is config for held in other.peft_config.values())
            for other in list(_LIVE_TUNERS)
        )
        if not shared:
            return config
        config = self.peft_config[adapter_name] = copy.deepcopy(config)
        for layer in sparta_layers(self.model):
            if adapter_name in layer.sparta_settings:
                layer.sparta_settings[adapter_name] = config
                layer.sparta_router[adapter_name].config = config
        return config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        granularity = self._granularity(config)
        query_dim = self._embedding_dim() if granularity == "sequence" else None
        owner = self._sequence_owners.get(adapter_name)
        if isinstance(target, SpaRTALayer):
            target.update_layer(adapter_name, config, granularity, query_dim, owner)
            self._keep_sequence_owner(target, adapter_name, granularity)
            return
        new_module = self._create_new_module(
            config,
            adapter_name,
            target,
            granularity=granularity,
            query_dim=query_dim,
            router_owner=owner,
            **get_quantization_kwargs(self.model),
        )
        self._keep_sequence_owner(new_module, adapter_name, granularity)
        new_module.routing_context = self.routing_context
        new_module.train(target.training)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _keep_sequence_owner(self, layer: SpaRTALayer, adapter_name: str, granularity: str) -> None:
        """Under sequence routing, the first layer injected holds the adapter's router state; the layers injected
        after it in the same injection share it."""
        if granularity == "sequence" and adapter_name not in self._sequence_owners:
            self._sequence_owners[adapter_name] = layer.sparta_router[adapter_name]

    @staticmethod
    def _create_new_module(config, adapter_name, target, get_apply_tensor_subclass=None, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, SpaRTALayer) else target
        kwargs["quantization_backend"] = quantization_backend(base_layer, get_apply_tensor_subclass)
        if isinstance(base_layer, nn.Linear):
            return Linear(target, adapter_name, config, fan_in_fan_out=False, **kwargs)
        if isinstance(base_layer, Conv1D):
            return Linear(target, adapter_name, config, fan_in_fan_out=True, **kwargs)
        raise ValueError(
            f"Target module {target} is not supported by SpaRTA. Currently, only `torch.nn.Linear` and "
            "`transformers.pytorch_utils.Conv1D` are supported; remove this module from target_modules."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(child.weight.device)

    def _embedding_dim(self) -> Optional[int]:
        embeddings = self._input_embeddings()
        return embeddings.embedding_dim if embeddings is not None else None

    def _input_embeddings(self) -> Optional[nn.Embedding]:
        getter = getattr(self.model, "get_input_embeddings", None)
        try:
            embeddings = getter() if getter is not None else None
        except NotImplementedError:
            return None
        return embeddings if isinstance(embeddings, nn.Embedding) else None

    def _granularity(self, config: SpaRTAConfig) -> str:
        """Resolve "auto": sequence routing when the model has input embeddings and the router is not spectral. The
        component router routes inside each layer from the layer's own input ("token" here, whatever weight
        granularity it is configured with)."""
        if config.router == "components":
            return "token"
        if config.router_granularity != "auto":
            if config.router_granularity == "sequence" and self._input_embeddings() is None:
                raise ValueError(
                    "router_granularity='sequence' needs a model with input embeddings (get_input_embeddings); this "
                    "model has none. Use router_granularity='token' or 'auto'."
                )
            return config.router_granularity
        if config.router != "spectral" and self._input_embeddings() is not None:
            return "sequence"
        return "token"

    def _post_injection_hook(self, model: nn.Module, config: SpaRTAConfig, adapter_name: str) -> None:
        """Register the routing and regularization hooks, once: a tuner injected into a model that an earlier SpaRTA
        tuner adapted (loading onto the same base twice) takes over its layers and hooks, so that each forward is
        routed and regularized once."""
        for layer in sparta_layers(model):
            layer.routing_context = self.routing_context
        if self._hook_handles:
            return
        for earlier in find_sparta_tuners(model):
            earlier._remove_hooks()
        self._hook_handles = [
            model.register_forward_pre_hook(self._routing_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._after_forward_hook, with_kwargs=True),
        ]

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # ---- per-forward hooks -------------------------------------------------------------------------------------------

    def _routing_pre_hook(self, module, args, kwargs):
        """Compute, once per forward, the sequence query and the prompt mask that the layers route with; at a task's
        first training forward, take the start values of stochastic restoration."""
        self.routing_context.begin_forward(args, kwargs, self._input_embeddings(), self._needs_sequence_query())
        if module.training:
            self._take_restore_points()
            for adapter_name in self.active_adapters:
                self._freeze_finished_modules_to_save(adapter_name)

    def _needs_sequence_query(self) -> bool:
        return any(
            layer.sparta_router[name].granularity == "sequence"
            for layer in iter_sparta_layers(self.model)
            for name in layer.active_adapters
            if name in layer.sparta_router
        )

    def _after_forward_hook(self, module, args, kwargs, output):
        """Tie the routing decided for this forward to its KV cache (its decode steps reuse it, and the embeddings'
        sums let a later forward extend it), and keep the regularizer values of a training forward for logging."""
        if module.training and self.routing_context.regularization:
            self.last_regularization = dict(self.routing_context.regularization)
        cache = kv_cache(output) if isinstance(output, dict) else None
        if not hasattr(cache, "get_seq_length"):
            return None
        forward = self.routing_context.forward
        if forward.sequence_query is not None:
            setattr(cache, CACHED_QUERY, forward.sequence_query)
            setattr(cache, CACHED_DECISIONS, (dict(forward.sequence_gates), dict(forward.sequence_routings)))
        if forward.embedding_sums is not None:
            setattr(cache, CACHED_EMBEDDING_SUMS, forward.embedding_sums)
        if forward.sequence_sums:
            setattr(cache, CACHED_SUMS, dict(forward.sequence_sums))
        return None

    # ---- regularizers ------------------------------------------------------------------------------------------------

    @property
    def penalty_scale(self) -> float:
        """Weight of the regularizers' gradient in each backward: 1 by default (one backward per optimizer step).

        With gradient accumulation over n micro-batches set it to 1 / n, and with fp16 loss scaling multiply it by
        the loss scale, so that the penalty is counted once per optimizer step; the Trainer callback does both.
        """
        return self.routing_context.penalty_scale

    @penalty_scale.setter
    def penalty_scale(self, scale: float) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"penalty_scale must be a finite number > 0, got {scale!r}.")
        self.routing_context.penalty_scale = float(scale)

    # ---- stochastic restoration (see `peft_sparta.restoration`) ------------------------------------------------------

    def _take_restore_points(self) -> None:
        """The start values of every active adapter with ``restore_every`` set that has none for its current task."""
        for adapter_name in self.active_adapters:
            config = self.peft_config.get(adapter_name)
            if getattr(config, "restore_every", None) is None or adapter_name in self._restore_points:
                continue
            named = [(name, param) for name, param in self.model.named_parameters() if _is_branch(name, adapter_name)]
            self._restore_points[adapter_name] = take_restore_point(named, len(config.task_names))
            count_optimizer_steps_of(self)

    def _count_optimizer_step(self, parameter_ids: set[int]) -> None:
        """An optimizer holding ``parameter_ids`` stepped: count it for the adapters it trains, restore when due."""
        for adapter_name, point in list(self._restore_points.items()):
            config = self.peft_config.get(adapter_name)
            if config is None or config.restore_every is None:
                self._restore_points.pop(adapter_name)
                continue
            if not point.holds_any(parameter_ids):
                continue
            point.steps += 1
            if point.steps % config.restore_every == 0:
                restore(point, config.restore_prob)

    def restore_stochastically(self, adapter_name: Optional[str] = None) -> int:
        """Stochastic restoration now: reset each trainable branch entry of the adapter, with probability
        ``restore_prob``, to its value at the start of the task's training. Returns the number of entries reset.

        Every optimizer step that updates the adapter already does this when ``restore_every`` steps are due; call it
        yourself where the optimizer holds copies of the parameters (DeepSpeed's engine).
        """
        adapter_name = self._adapter(adapter_name)
        point = self._restore_points.get(adapter_name)
        if point is None:
            raise ValueError(
                f"Adapter '{adapter_name}' has no restore point: the start values are taken at the first training "
                "forward of a task, when the adapter's config sets restore_every."
            )
        return restore(point, self.peft_config[adapter_name].restore_prob)

    # ---- continual API -----------------------------------------------------------------------------------------------

    def _adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(
                    f"Several adapters are active ({self.active_adapters}); pass adapter_name to choose one."
                )
            return self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter '{adapter_name}'; available: {sorted(self.peft_config)}.")
        return adapter_name

    @property
    def task_names(self) -> list[str]:
        """Task names of the active adapter, in training order; the last one is the task being trained."""
        return self.get_task_names()

    def get_task_names(self, adapter_name: Optional[str] = None) -> list[str]:
        """Task names of the adapter, in training order; the last one is the task being trained."""
        return list(self.peft_config[self._adapter(adapter_name)].task_names)

    def add_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Freeze the current task branch and its router state on every adapted layer and add a new task branch.

        A task forced with `set_task` is released, so that the new task trains through its own branch. The new
        branch's parameters are new tensors: build the optimizer (or the Trainer) for the new task after this call.
        """
        adapter_name = self._adapter(adapter_name)
        config = self._own_config(adapter_name)
        if not isinstance(task_name, str) or not task_name:
            raise ValueError(f"A task name must be a non-empty string, got {task_name!r}.")
        if task_name in config.task_names:
            raise ValueError(f"Task '{task_name}' already exists in adapter '{adapter_name}': {config.task_names}.")
        layers = [layer for layer in sparta_layers(self.model) if adapter_name in layer.sparta_A_task]
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot add a task while the adapter is merged; call unmerge_adapter() first.")
        for layer in layers:
            layer.add_task(adapter_name)
        config.task_names.append(task_name)
        self._freeze_finished_modules_to_save(adapter_name)
        self._built_with[adapter_name]["task_names"] = list(config.task_names)
        self._restore_points.pop(adapter_name, None)
        self.set_task(None, adapter_name)

    def remove_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Remove ``task_name``'s branch and router state from every adapted layer, as if the task had never been
        learned: inputs are routed among the remaining tasks only. What the task taught the shared branch (while it
        was trainable: the first task, or every task with ``shared_update="train"``) stays. Removing the newest task
        makes the one before it the current (trainable) task again."""
        adapter_name = self._adapter(adapter_name)
        config = self._own_config(adapter_name)
        if task_name not in config.task_names:
            raise ValueError(
                f"Unknown task '{task_name}' for adapter '{adapter_name}'; known tasks: {config.task_names}."
            )
        if len(config.task_names) == 1:
            raise ValueError(
                f"'{task_name}' is the only task of adapter '{adapter_name}'; an adapter keeps at least one task. Use "
                "delete_adapter to remove the whole adapter."
            )
        layers = [layer for layer in sparta_layers(self.model) if adapter_name in layer.sparta_A_task]
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise ValueError("Cannot remove a task while the adapter is merged; call unmerge_adapter() first.")
        index = config.task_names.index(task_name)
        before = {param for layer in layers for param in layer.adapter_parameters(adapter_name)}
        for layer in layers:
            layer.remove_task(adapter_name, index)
        after = {param for layer in layers for param in layer.adapter_parameters(adapter_name)}
        self.removed_parameters.update(before - after)
        config.task_names.remove(task_name)
        self._built_with[adapter_name]["task_names"] = list(config.task_names)
        if len(config.task_names) == 1 and layers and layers[0].sparta_A_task[adapter_name][-1].requires_grad:
            for module in self._modules_to_save(adapter_name):
                module.requires_grad_(True)  # trainable again, as with the first task alone
        self._restore_points.pop(adapter_name, None)

    def _modules_to_save(self, adapter_name: str) -> list[nn.Module]:
        """The adapter's copies of the modules in ``modules_to_save`` (e.g. the head PEFT adds for SEQ_CLS)."""
        if not getattr(self.peft_config.get(adapter_name), "modules_to_save", None):
            return []
        wrappers = (module for module in self.model.modules() if isinstance(module, ModulesToSaveWrapper))
        return [
            wrapper.modules_to_save[adapter_name] for wrapper in wrappers if adapter_name in wrapper.modules_to_save
        ]

    def _freeze_finished_modules_to_save(self, adapter_name: str) -> None:
        """``modules_to_save`` (a classification head) follow the shared branch: one module for every task, trained
        with the first task and frozen by the first `add_task` under ``shared_update="freeze_after_first"``, so that
        training a later task cannot move an earlier task's outputs through it; trained on every task under "train".
        PEFT makes them trainable again in `set_adapter` and when loading with ``is_trainable=True``, so every training
        forward freezes them again."""
        config = self.peft_config.get(adapter_name)
        if config is None or config.shared_update == "train" or len(config.task_names) <= 1:
            return
        for module in self._modules_to_save(adapter_name):
            module.requires_grad_(False)

    def set_task(self, task_name: Optional[str], adapter_name: Optional[str] = None) -> None:
        """Route every input to ``task_name``'s branch (task-aware evaluation, merging), or to the router (None)."""
        adapter_name = self._adapter(adapter_name)
        names = self.peft_config[adapter_name].task_names
        if task_name is not None and task_name not in names:
            raise ValueError(f"Unknown task '{task_name}' for adapter '{adapter_name}'; known tasks: {names}.")
        index = None if task_name is None else names.index(task_name)
        layers = [layer for layer in sparta_layers(self.model) if adapter_name in layer.forced_task]
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise ValueError(
                f"Adapter '{adapter_name}' is merged into the base weights, with task "
                f"'{names[layers[0].merged_task[adapter_name]]}'; a merged adapter cannot be routed. Call "
                "model.unmerge_adapter() first."
            )
        for layer in layers:
            if adapter_name in layer.forced_task:
                layer.forced_task[adapter_name] = index

    def export_lora(
        self,
        save_directory: str,
        tasks: Optional[list[str]] = None,
        adapter_name: Optional[str] = None,
        progressbar: bool = False,
    ) -> dict[Optional[str], str]:
        """Write each task as a plain PEFT LoRA adapter (``save_directory/<task>/``) and the shared branch alone
        (``save_directory/_shared_only/``), for engines that serve LoRA; see `peft_sparta.export.export_lora`."""
        return export_lora(self, save_directory, tasks, adapter_name, progressbar)

    # ---- PEFT overrides ----------------------------------------------------------------------------------------------

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            for layer in sparta_layers(self.model):
                for name in adapter_names or layer.active_adapters:
                    if name in layer.sparta_A_task and name not in layer.merged_adapters:
                        layer._merge_task(name)
        self._remove_hooks()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: PEFT's rule, plus the routers' nested state (``sparta_router.<adapter>.keys.0``
        is saved as ``sparta_router.keys.0``)."""
        nested = f".sparta_router.{adapter_name}."
        if nested in key:
            return key.replace(nested, ".sparta_router.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Map checkpoint keys to the model's, from any saved format version, and check them (see `checkpoint`)."""
        state_dict = {current_key(key): value for key, value in state_dict.items()}
        check_task_count(state_dict, config)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        remapped = drop_per_layer_router_copies(remapped, expected, config)
        remapped = add_missing_query_spread(remapped, expected, config)
        remapped = split_pooled_query_spread(remapped, config)
        check_checkpoint(expected, remapped, config)
        return remapped


def find_sparta_tuner(model: nn.Module) -> Optional[SpaRTAModel]:
    """The `SpaRTAModel` tuner of ``model``: the tuner itself, a PeftModel holding it, either wrapped by DDP,
    accelerate or DeepSpeed (``.module``), or the base model it was injected into (found by its routing hook); None
    when there is none."""
    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, SpaRTAModel):
            return candidate
        if isinstance(getattr(candidate, "base_model", None), SpaRTAModel):
            return candidate.base_model
    tuners = find_sparta_tuners(model)
    return tuners[-1] if tuners else None


def find_sparta_tuners(model: nn.Module) -> list[SpaRTAModel]:
    """The SpaRTA tuners whose routing hook is registered on ``model``, oldest first."""
    hooks = getattr(model, "_forward_pre_hooks", {}).values()
    return [hook.__self__ for hook in hooks if isinstance(getattr(hook, "__self__", None), SpaRTAModel)]


def _is_branch(parameter_name: str, adapter_name: str) -> bool:
    """Whether a model parameter is one of the adapter's branch matrices (not its router state)."""
    parts = parameter_name.split(".")
    return any(part in BRANCH_CONTAINERS and parts[i + 1] == adapter_name for i, part in enumerate(parts[:-1]))
