"""Make "SPARTA" a member of PEFT's closed `PeftType` enum and register the method with PEFT."""

from __future__ import annotations

from peft.utils.peft_types import PeftType


SPARTA_NAME = "SPARTA"


def extend_peft_type() -> PeftType:
    """Add SPARTA to `PeftType`, once: as a value, as a name and as a class attribute.

    `PeftType` is a closed `str` Enum; PEFT looks methods up by `PeftType(value)`, `PeftType[name]`, `list(PeftType)`
    and `PeftType.SPARTA`, so the member has to be present in every one of the enum's lookup structures.
    """
    if SPARTA_NAME in PeftType.__members__:
        return PeftType[SPARTA_NAME]
    member = str.__new__(PeftType, SPARTA_NAME)
    member._name_ = SPARTA_NAME
    member._value_ = SPARTA_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, SPARTA_NAME, member)
    PeftType._member_map_[SPARTA_NAME] = member
    PeftType._value2member_map_[SPARTA_NAME] = member
    PeftType._member_names_.append(SPARTA_NAME)
    return member


def register_sparta(config_cls, model_cls) -> None:
    """Register SpaRTA with PEFT unless this process already did (PEFT's own registration raises on a repeat)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE_SPARTA) is model_cls:
        return
    register_peft_method(name=SPARTA_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="sparta_")


PEFT_TYPE_SPARTA = extend_peft_type()
