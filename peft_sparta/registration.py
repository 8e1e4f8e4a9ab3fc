"""Make "SPARTA" a member of PEFT's closed `PeftType` enum and register the method with PEFT."""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType


SPARTA_NAME = "SPARTA"


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
    register_peft_method(name=SPARTA_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="sparta_")


PEFT_TYPE_SPARTA = extend_str_enum(PeftType, SPARTA_NAME)
