"""What SpaRTA adds to PEFT's `PeftModel` where PEFT offers no extension point: the model card written by
`save_pretrained`/`push_to_hub`, a save that refuses a config no longer matching its layers, and loading that fails
cleanly (a failed load puts the model back as it was).

Each wrapper acts only on SpaRTA adapters and defers to PEFT's own method for every other method. `registration.install`
puts them in place when the package is imported.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional

import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from .checkpoint import check_task_count
from .config import PEFT_TYPE, SpaRTAConfig
from .errors import SpaRTALoadError
from .layer import SpaRTALayer
from .model import SpaRTAModel, find_sparta_tuners
from .variants import task_branch_variant


LEFT_AS_IT_WAS = "The model was left as it was."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_CARD_TAGS = ("sparta", "continual-learning")
MODEL_CARD_HEADING = "## SpaRTA adapter"


def _is_sparta(config) -> bool:
    return getattr(config, "peft_type", None) == PEFT_TYPE


def model_card_section(model: PeftModel, adapter_name: str) -> str:
    """Markdown describing a SpaRTA adapter: tasks, ranks, router, and how to load it (import peft_sparta first).

    Task names and the base model's name are anyone's text: the list shows them as code spans on one line, the code
    snippet as Python literals (`repr`), so that no name can add a line to the card or to its code."""
    config = model.peft_config[adapter_name]
    tasks = "\n".join(f"{index}. {_code_span(name)}" for index, name in enumerate(config.task_names, start=1))
    base = config.base_model_name_or_path or "<base model>"
    design = task_branch_variant(config).model_card_design(config)
    snippet = f"""import peft_sparta  # pip install peft-sparta-cl
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({base!r})
model = PeftModel.from_pretrained(base, "<this repo>")
model.set_task(None)  # the router decides; or model.set_task({config.task_names[-1]!r})
"""
    fence = "`" * max(3, _longest_backtick_run(snippet) + 1)
    return f"""{MODEL_CARD_HEADING}

Continual-learning adapter trained with [SpaRTA](https://pypi.org/project/peft-sparta-cl/): {design} (no task id
needed at inference).

Tasks, in training order:
{tasks}

Load it (the `import peft_sparta` line is required: it registers the SPARTA adapter type with PEFT, without it PEFT
raises `KeyError: 'SPARTA'`):

{fence}python
{snippet}{fence}
"""


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span on one line (control characters written as Python escapes), delimited by more
    backticks than it holds in a row, so that it shows as written."""
    text = repr(text)[1:-1]
    fence = "`" * (_longest_backtick_run(text) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _add_sparta_card_content(model: PeftModel, output_dir: str) -> None:
    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename)
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(MODEL_CARD_TAGS))
    section = model_card_section(model, model.active_adapter)
    text = card.text
    if MODEL_CARD_HEADING in text:
        text = text[: text.index(MODEL_CARD_HEADING)].rstrip() + "\n"
    card.text = f"{text}\n{section}"
    card.save(filename)


def wrap_model_card(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if _is_sparta(self.active_peft_config):
            _add_sparta_card_content(self, output_dir)

    return create_or_update_model_card


def wrap_upload(original):
    @functools.wraps(original)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if isinstance(self, PeftModel) and _is_sparta(self.active_peft_config):
            # push_to_hub replaces the card written by save_pretrained with the Hub's one: put SpaRTA's back
            self.create_or_update_model_card(working_dir)
        return original(self, working_dir, *args, **kwargs)

    return _upload_modified_files


def wrap_save(original):
    """Check every SpaRTA adapter to be saved against its layers first (`SpaRTAModel.check_config_matches_layers`), so
    that a config edited after the model was built raises before any file is written."""

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        tuner = self.base_model
        if isinstance(tuner, SpaRTAModel):
            selected = kwargs.get("selected_adapters", args[1] if len(args) > 1 else None)
            for adapter_name in selected or list(self.peft_config):
                if _is_sparta(self.peft_config.get(adapter_name)):
                    tuner.check_config_matches_layers(adapter_name)
        return original(self, save_directory, *args, **kwargs)

    return save_pretrained


class ModelSnapshot:
    """What loading an adapter can change in a model, recorded so that a failed load can put it back exactly.

    Loading injects layers (module tree), adds adapters to existing tuner layers (their per-adapter containers),
    registers hooks, sets ``peft_config`` on the model, changes ``requires_grad`` and train/eval modes; no tensor is
    changed in place, so references to the old objects are enough to restore them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(module, dict(module._modules), module.training) for module in model.modules()]
        self.hooks = [(module, [dict(hooks) for hooks in _hook_dicts(module)]) for module in model.modules()]
        self.requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        self.attributes = [(module, _load_attributes(module)) for module in model.modules()]
        self.adapters = [(layer, _adapter_state(layer)) for layer in model.modules() if isinstance(layer, SpaRTALayer)]
        self.tuner_hooks = [(tuner, list(tuner._hook_handles)) for tuner in find_sparta_tuners(model)]
        self.configs = [
            (tuner, dict(tuner.peft_config), tuner.active_adapter)
            for tuner in model.modules()
            if isinstance(tuner, BaseTuner)
        ]

    def restore(self) -> None:
        for module, children, training in self.modules:
            module._modules.clear()
            module._modules.update(children)
            module.training = training
        for module, dicts in self.hooks:
            for current, saved in zip(_hook_dicts(module), dicts):
                current.clear()
                current.update(saved)
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)
        for module, attributes in self.attributes:
            for name in _LOAD_ATTRIBUTES:
                if name in attributes:
                    setattr(module, name, attributes[name])
                elif name in module.__dict__:
                    delattr(module, name)
        for layer, state in self.adapters:
            for name, (container, items) in state.items():
                container.clear()
                container.update(items)
                if name in _LAYER_ATTRIBUTES:
                    setattr(layer, name, items["value"])
        for tuner, handles in self.tuner_hooks:
            tuner._hook_handles = handles
        for tuner, configs, active in self.configs:
            tuner.peft_config.clear()
            tuner.peft_config.update(configs)
            tuner.active_adapter = active


#: Attributes that PEFT and transformers set on a model when an adapter is loaded into it.
_LOAD_ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded", "active_adapter")
#: Per-layer values (not per-adapter containers) that injecting an adapter changes.
_LAYER_ATTRIBUTES = ("routing_context", "_active_adapter", "merged_adapters")


def _hook_dicts(module: nn.Module) -> list[dict]:
    names = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs")
    return [getattr(module, name) for name in (*names, "_forward_hooks_always_called")]


def _load_attributes(module: nn.Module) -> dict:
    return {name: module.__dict__[name] for name in _LOAD_ATTRIBUTES if name in module.__dict__}


def _adapter_state(layer: SpaRTALayer) -> dict:
    """Every per-adapter container of the layer with a copy of its items, and the layer-wide values, as
    ``{name: (container, items)}``; a layer-wide value is held in a one-item dict under "value"."""
    state = {}
    for name in layer.adapter_layer_names + layer.other_param_names:
        container = getattr(layer, name)
        state[name] = (container, dict(container.items()))
    for name in _LAYER_ATTRIBUTES:
        value = getattr(layer, name)
        state[name] = ({}, {"value": list(value) if isinstance(value, list) else value})
    return state


def wrap_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name: str, *args, **kwargs):
        snapshot = ModelSnapshot(self)
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            snapshot.restore()
            if not _is_sparta_source(model_id, kwargs.get("subfolder")):
                raise
            raise _load_error(error, model_id, kwargs.get("subfolder")) from error

    return load_adapter


def wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        snapshot = ModelSnapshot(model)
        tuners_before = find_sparta_tuners(model)
        try:
            return original.__func__(cls, model, model_id, *args, **kwargs)
        except Exception as error:
            injected = any(tuner not in tuners_before for tuner in find_sparta_tuners(model))
            snapshot.restore()
            if not injected and not _is_sparta_source(model_id, kwargs.get("subfolder")):
                raise
            raise _load_error(error, model_id, kwargs.get("subfolder")) from error

    return classmethod(from_pretrained)


def wrap_transformers_load_adapter(original):
    """transformers' ``model.load_adapter`` loads the weights with its own loader, which neither checks a SpaRTA
    checkpoint nor undoes a failed load: for SpaRTA adapters, check the loaded tensors against the file (every tensor
    present, in place, nothing extra) and restore the model on any failure."""

    @functools.wraps(original)
    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        if kwargs.get("adapter_state_dict") is not None or not _is_sparta_source(
            peft_model_id, kwargs.get("subfolder")
        ):
            return original(self, peft_model_id, adapter_name, *args, **kwargs)
        adapter_name = adapter_name or "default"
        snapshot = ModelSnapshot(self)
        try:
            checkpoint = load_peft_weights(str(peft_model_id), device="cpu", subfolder=kwargs.get("subfolder"))
            check_task_count(
                checkpoint, SpaRTAConfig.from_pretrained(peft_model_id, subfolder=kwargs.get("subfolder"))
            )
            result = original(self, peft_model_id, adapter_name, *args, **kwargs)
            _check_loaded_weights(self, checkpoint, adapter_name)
            return result
        except Exception as error:
            snapshot.restore()
            raise _load_error(error, peft_model_id, kwargs.get("subfolder")) from error

    return load_adapter


def _check_loaded_weights(model: nn.Module, checkpoint: dict, adapter_name: str) -> None:
    """Every tensor of the checkpoint is in ``model`` under its key, with its value, and the model has no SpaRTA
    tensor that the checkpoint lacks."""
    config = model.peft_config[adapter_name]
    remapped = SpaRTAModel._remap_adapter_state_dict_for_load(model, config, adapter_name, checkpoint)
    state = model.state_dict()
    differing = [
        key for key, value in remapped.items() if not torch.equal(state[key].cpu(), value.to(state[key].dtype))
    ]
    if differing:
        raise SpaRTALoadError(f"{len(differing)} tensors were not loaded into the model, e.g. {differing[0]}.")


def _local_folder(model_id, subfolder: Optional[str]) -> Optional[str]:
    folder = os.path.join(str(model_id), subfolder or "")
    return folder if os.path.isdir(folder) else None


def _is_sparta_source(model_id, subfolder: Optional[str]) -> bool:
    """Whether ``model_id`` is a local folder whose adapter_config.json names a SpaRTA adapter."""
    folder = _local_folder(model_id, subfolder)
    try:
        with open(os.path.join(folder, "adapter_config.json")) as file:
            return json.load(file).get("peft_type") == PEFT_TYPE
    except (TypeError, OSError, ValueError, AttributeError):
        return False


def _load_error(error: Exception, model_id, subfolder: Optional[str] = None) -> SpaRTALoadError:
    if isinstance(error, SpaRTALoadError):
        return error if str(error).endswith(LEFT_AS_IT_WAS) else SpaRTALoadError(f"{error} {LEFT_AS_IT_WAS}")
    folder = _local_folder(model_id, subfolder)
    if folder is not None and not any(os.path.exists(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return SpaRTALoadError(
            f"The folder {folder!r} holds no adapter weights ({' or '.join(WEIGHT_FILES)}): it was not written by "
            "save_pretrained, or the weights file was removed. " + LEFT_AS_IT_WAS
        )
    return SpaRTALoadError(
        f"Could not load the SpaRTA adapter from {str(model_id)!r}: {type(error).__name__}: {error}. The model was left "
        "as it was. Check that the adapter's files are complete and uncorrupted; if they are, please report this "
        "error to peft-sparta-cl."
    )
