"""Every process-wide change SpaRTA makes to PEFT, transformers and the Trainer, made here and nowhere else.

`import peft_sparta` runs `install` once per process (a second call does nothing). It makes these changes:

- PEFT's closed `PeftType` enum gains the member "SPARTA" (`PEFT_TYPE_SPARTA`, `extend_str_enum`), made when this
  module is imported, and `register_peft_method` maps it to `SpaRTAConfig` and `SpaRTAModel` (`register_sparta`),
  so that `get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModel*` work with
  SpaRTA adapters;
- `PeftModel.create_or_update_model_card` writes SpaRTA's model card, `PeftModel._upload_modified_files` uploads it
  with the adapter, `PeftModel.save_pretrained` refuses a config that no longer matches its layers before writing,
  `PeftModel.load_adapter` and `PeftModel.from_pretrained` check a SpaRTA checkpoint and put the model back as it was
  when loading fails (wrappers in `hub`);
- transformers' `PeftAdapterMixin.load_adapter` (``model.load_adapter`` on a transformers model) checks the loaded
  tensors against the file and restores the model on a failure (`hub`);
- `transformers.Trainer.__init__` (TRL's trainers included) adds a `SpaRTACallback` when the trainer trains a SpaRTA
  model (`trainer`).

Each wrapper acts on SpaRTA models and adapters only and defers to the original for everything else. Besides these,
the package registers two global hooks of torch's optimizers when the first SpaRTA model is built: a step pre-hook
(`optimizer_guard`: gradients of frozen branches cleared, a warning for trainable branches an optimizer misses) and a
step post-hook (`restoration`: the optimizer steps the paper design's stochastic restoration counts).
"""

from __future__ import annotations

import enum

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType
from transformers import Trainer
from transformers.integrations.peft import PeftAdapterMixin

from . import hub, trainer
from .config import PEFT_TYPE, SpaRTAConfig
from .model import SpaRTAModel


def extend_str_enum(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add member ``name`` (value ``name``) to a closed ``str`` Enum, once, and return it.

    Lookups go through `enum_cls(value)`, `enum_cls[name]`, iteration and, on Python >= 3.12, the class attribute,
    so the member is put in every one of the enum's lookup structures. It depends on nothing but `enum`, so that
    it can be tested on any closed ``str`` Enum on every supported Python.
    """
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def register_sparta(config_cls, model_cls) -> None:
    """Register SpaRTA with PEFT unless this process already did (PEFT's own registration raises on a repeat)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE_SPARTA) is model_cls:
        return
    register_peft_method(name=PEFT_TYPE.lower(), config_cls=config_cls, model_cls=model_cls, prefix="sparta_")


def install() -> None:
    """Make the changes the module docstring lists, once per process."""
    register_sparta(SpaRTAConfig, SpaRTAModel)
    if not getattr(PeftModel, "_sparta_integration", False):
        PeftModel.create_or_update_model_card = hub.wrap_model_card(PeftModel.create_or_update_model_card)
        PeftModel._upload_modified_files = hub.wrap_upload(PeftModel._upload_modified_files)
        PeftModel.save_pretrained = hub.wrap_save(PeftModel.save_pretrained)
        PeftModel.load_adapter = hub.wrap_load_adapter(PeftModel.load_adapter)
        PeftModel.from_pretrained = hub.wrap_from_pretrained(PeftModel.from_pretrained)
        PeftAdapterMixin.load_adapter = hub.wrap_transformers_load_adapter(PeftAdapterMixin.load_adapter)
        PeftModel._sparta_integration = True
    if not getattr(Trainer, "_sparta_integration", False):
        Trainer.__init__ = trainer.with_sparta_callback(Trainer.__init__)
        Trainer._sparta_integration = True


PEFT_TYPE_SPARTA = extend_str_enum(PeftType, PEFT_TYPE)
