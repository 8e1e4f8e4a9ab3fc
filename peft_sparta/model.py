"""The SpaRTA tuner: injects SpaRTA layers, routes, adds tasks and adds its regularizers to the model's loss."""

from __future__ import annotations

from typing import Optional

import re

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SpaRTAConfig
from .integration import SpaRTALoadError
from .layer import Linear, SpaRTALayer
from .router import RoutingContext


IGNORE_INDEX = -100


class SpaRTAModel(BaseTuner):
    """
    Creates a SpaRTA model from a pretrained transformers model.

    Every targeted linear layer gets a shared low-rank branch, one high-rank branch per task and a router; see
    [`SpaRTAConfig`]. The model adds tasks (`add_task`), forces or releases routing (`set_task`), and, in training
    mode, adds its regularizers to `outputs.loss` inside forward, as transformers' MoE models add their auxiliary
    loss, so any trainer trains it unchanged.

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
        self._hook_handles: list = []
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- injection ---------------------------------------------------------------------------------------------------

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        granularity = self._granularity(config)
        query_dim = self._embedding_dim() if granularity == "sequence" else None
        if isinstance(target, SpaRTALayer):
            target.update_layer(adapter_name, config, granularity, query_dim)
            return
        new_module = self._create_new_module(config, adapter_name, target, granularity=granularity, query_dim=query_dim)
        new_module.routing_context = self.routing_context
        new_module.train(target.training)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, SpaRTALayer) else target
        if _is_quantized(base_layer):
            raise ValueError(
                f"Target module {target} is a quantized layer ({type(base_layer).__module__}."
                f"{type(base_layer).__name__}); SpaRTA does not support quantized base layers (bitsandbytes 8/4-bit, "
                "GPTQ, AWQ, torchao) yet. Load the base model unquantized, or exclude this module."
            )
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
        """Resolve "auto": sequence routing when the model has input embeddings and the router is not spectral."""
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
        if self._hook_handles:
            return
        self._hook_handles = [
            model.register_forward_pre_hook(self._routing_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._regularization_hook, with_kwargs=True),
        ]

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # ---- per-forward hooks -------------------------------------------------------------------------------------------

    def _routing_pre_hook(self, module, args, kwargs):
        """Compute, once per forward, the sequence query and the prompt mask that the layers route with."""
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        context = self.routing_context
        token_ids = input_ids if input_ids is not None else inputs_embeds
        if token_ids is None or token_ids.dim() < 2:
            context.clear()
            return None
        batch, length = token_ids.shape[:2]
        query = context.sequence_query
        if query is not None and query.shape[0] == batch and _extends_cached_sequence(kwargs, length):
            # a decode step: keep routing as decided from the prompt at prefill
            context.token_mask = None
            return None
        valid = torch.ones(batch, length, dtype=torch.bool, device=token_ids.device)
        if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
            valid = attention_mask.bool()
        context.token_mask = self._prompt_mask(valid, labels)
        context.sequence_query = self._sequence_query(input_ids, inputs_embeds, context.token_mask)
        return None

    @staticmethod
    def _prompt_mask(valid: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Positions whose queries describe the input: with token labels, the prompt part (label -100) only, since
        test inputs carry no answer; rows without such a part, and inputs without token labels, use every position."""
        if labels is None or tuple(labels.shape) != tuple(valid.shape):
            return valid
        prompt = valid & (labels == IGNORE_INDEX)
        has_prompt = prompt.any(dim=1, keepdim=True)
        return torch.where(has_prompt, prompt, valid)

    def _sequence_query(self, input_ids, inputs_embeds, mask: torch.Tensor) -> Optional[torch.Tensor]:
        if not self._needs_sequence_query():
            return None
        with torch.no_grad():
            if inputs_embeds is None:
                inputs_embeds = self._input_embeddings()(input_ids)
            weights = mask.to(inputs_embeds.device, torch.float32).unsqueeze(-1)
            summed = (inputs_embeds.float() * weights).sum(dim=1)
            return summed / weights.sum(dim=1).clamp(min=1.0)

    def _needs_sequence_query(self) -> bool:
        return any(
            layer.granularity.get(name) == "sequence"
            for layer in self._sparta_layers()
            for name in layer.active_adapters
        )

    def _regularization_hook(self, module, args, kwargs, output):
        """In training, add the regularizers to the loss the model computed (MoE auxiliary-loss convention)."""
        if not module.training or not torch.is_grad_enabled():
            return None
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            return None
        output["loss"] = loss + self.regularization_loss().to(loss.dtype)
        return output

    # ---- regularizers ------------------------------------------------------------------------------------------------

    def _sparta_layers(self):
        return [module for module in self.model.modules() if isinstance(module, SpaRTALayer)]

    def regularization_losses(self) -> dict[str, torch.Tensor]:
        """The unweighted orthogonality and router losses of the active adapters, summed over adapted layers.

        The router loss is the one of the last training forward (learned router); both are 0 when not applicable.
        """
        orth, router = [], []
        for layer in self._sparta_layers():
            for name in layer.active_adapters:
                if name not in layer.sparta_A_task:
                    continue
                config = self.peft_config[name]
                penalty = layer.orthogonality_loss(name) if config.orth_lambda > 0 else None
                if penalty is not None:
                    orth.append(config.orth_lambda * penalty)
                if name in layer.last_router_loss:
                    router.append(config.router_lambda * layer.last_router_loss.pop(name))
        zero = torch.zeros((), device=self._reference_device())
        return {
            "orthogonality": torch.stack(orth).sum() if orth else zero,
            "router": torch.stack(router).sum() if router else zero,
        }

    def regularization_loss(self) -> torch.Tensor:
        """Weighted sum of the regularizers, as added to `outputs.loss` in training mode."""
        losses = self.regularization_losses()
        self.last_regularization = {name: value.detach() for name, value in losses.items()}
        return sum(losses.values())

    def _reference_device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        """Freeze the current task branch and its router state on every adapted layer and add a new task branch."""
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if not isinstance(task_name, str) or not task_name:
            raise ValueError(f"A task name must be a non-empty string, got {task_name!r}.")
        if task_name in config.task_names:
            raise ValueError(f"Task '{task_name}' already exists in adapter '{adapter_name}': {config.task_names}.")
        layers = [layer for layer in self._sparta_layers() if adapter_name in layer.sparta_A_task]
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot add a task while the adapter is merged; call unmerge_adapter() first.")
        for layer in layers:
            layer.add_task(adapter_name)
        config.task_names.append(task_name)

    def set_task(self, task_name: Optional[str], adapter_name: Optional[str] = None) -> None:
        """Route every input to ``task_name``'s branch (task-aware evaluation, merging), or to the router (None)."""
        adapter_name = self._adapter(adapter_name)
        names = self.peft_config[adapter_name].task_names
        if task_name is not None and task_name not in names:
            raise ValueError(f"Unknown task '{task_name}' for adapter '{adapter_name}'; known tasks: {names}.")
        index = None if task_name is None else names.index(task_name)
        for layer in self._sparta_layers():
            if adapter_name in layer.forced_task:
                layer.forced_task[adapter_name] = index

    # ---- PEFT overrides ----------------------------------------------------------------------------------------------

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        self._remove_hooks()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Map checkpoint keys to the model's and check them: every branch of every task present, shapes equal."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        _check_checkpoint(expected, remapped, config, adapter_name)
        return remapped


def find_sparta_tuner(model: nn.Module) -> Optional[SpaRTAModel]:
    """The `SpaRTAModel` tuner of ``model``: the tuner itself, a PeftModel holding it, or either wrapped by DDP,
    accelerate or DeepSpeed (``.module``); None when there is none."""
    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, SpaRTAModel):
            return candidate
        if isinstance(getattr(candidate, "base_model", None), SpaRTAModel):
            return candidate.base_model
    return None


def _extends_cached_sequence(kwargs: dict, length: int) -> bool:
    """Whether a forward continues a sequence whose earlier tokens sit in a KV cache (a generation decode step).

    The attention mask, when given, is longer than the new tokens; transformers drops an all-ones mask, so a cache
    that already holds tokens says the same."""
    attention_mask = kwargs.get("attention_mask")
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and attention_mask.shape[1] > length:
        return True
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    cached_length = getattr(cache, "get_seq_length", None)
    return cached_length is not None and cached_length() > 0


def _is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    quantized_libraries = ("bitsandbytes", "torchao", "auto_gptq", "gptqmodel", "awq", "optimum")
    return (weight is not None and not weight.dtype.is_floating_point) or type(layer).__module__.startswith(
        quantized_libraries
    )


def _check_checkpoint(expected: dict, checkpoint: dict, config: SpaRTAConfig, adapter_name: str) -> None:
    task_key = re.compile(rf"\.sparta_A_task\.{re.escape(adapter_name)}\.(\d+)$")
    saved_tasks = {int(m.group(1)) for key in checkpoint if (m := task_key.search(key))}
    if saved_tasks and len(saved_tasks) != len(config.task_names):
        raise SpaRTALoadError(
            f"The adapter config names {len(config.task_names)} tasks ({', '.join(config.task_names)}) but its "
            f"weights hold {len(saved_tasks)} task branches: adapter_config.json and the weights file come from "
            "different saves. Save the adapter again, or restore the matching files."
        )
    missing = sorted(set(expected) - set(checkpoint))
    if missing:
        raise SpaRTALoadError(
            f"The adapter's weights lack {len(missing)} tensors that its config requires, e.g. {missing[0]}: the "
            "weights file is incomplete or was saved for other target modules."
        )
    mismatched = [
        f"{key}: checkpoint {tuple(checkpoint[key].shape)}, model {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(checkpoint[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise SpaRTALoadError(
            "The adapter was saved for a base model whose adapted layers have other shapes; load it into the base "
            "model it was trained on. Mismatches: " + "; ".join(mismatched[:3])
        )
