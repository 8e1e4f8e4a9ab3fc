from __future__ import annotations

import pytest

from peft_sparta import PEFT_TYPE_SPARTA, SpaRTAConfig
from peft_sparta.config import FORMAT_VERSION


def test_defaults():
    config = SpaRTAConfig(target_modules=["q_proj", "v_proj"])
    assert config.peft_type == PEFT_TYPE_SPARTA
    assert config.task_names == ["task_0"]
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.format_version == FORMAT_VERSION
    assert config.router == "prototype" and config.router_granularity == "auto"
    assert config.shared_update == "freeze_after_first"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r_shared", -1),
        ("r_shared", 1.5),
        ("r_task", 0),
        ("r_task", True),
        ("alpha_shared", 0),
        ("alpha_task", -2.0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("init_weights", "kaiming"),
        ("init_weights", 1),
        ("router", "moe"),
        ("router_granularity", "batch"),
        ("router_dim", 0),
        ("router_temperature", 0.0),
        ("router_prototypes", 0),
        ("top_k", 0),
        ("router_min_gate", 1.0),
        ("router_min_gate", -0.01),
        ("router_min_gate", float("nan")),
        ("router_abstain_threshold", 1.5),
        ("router_abstain_threshold", True),
        ("router_abstain_spread", 0.0),
        ("router_abstain_spread", float("inf")),
        ("router_metric", "euclidean"),
        ("orth_lambda", -1.0),
        ("orth_norm", "l2"),
        ("router_lambda", -0.5),
        ("shared_update", "sometimes"),
        ("kernel_backend", "cuda"),
        ("task_names", []),
        ("task_names", ["a", "a"]),
        ("task_names", ["a", ""]),
        ("bias", "lora_only"),
        ("format_version", 0),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SpaRTAConfig(target_modules=["q_proj"], **{field: value})


def test_newer_format_version_is_rejected_with_upgrade_hint():
    with pytest.raises(ValueError, match="Upgrade peft-sparta-cl"):
        SpaRTAConfig(target_modules=["q_proj"], format_version=FORMAT_VERSION + 1)


def test_spectral_router_with_sequence_granularity_is_rejected():
    with pytest.raises(ValueError, match="router_granularity"):
        SpaRTAConfig(target_modules=["q_proj"], router="spectral", router_granularity="sequence")


def test_every_field_has_help():
    from dataclasses import fields

    own = {f.name for f in fields(SpaRTAConfig)} - {f.name for f in fields(SpaRTAConfig.__mro__[1])}
    assert own, "SpaRTAConfig declares no fields"
    for field in fields(SpaRTAConfig):
        if field.name in own:
            assert field.metadata.get("help"), f"{field.name} has no help text"


def test_discriminant_metric_needs_the_prototype_router_also_when_set_at_run_time():
    with pytest.raises(ValueError, match="router_metric='discriminant'.*router='prototype'"):
        SpaRTAConfig(target_modules=["q_proj"], router="learned", router_metric="discriminant")
    config = SpaRTAConfig(target_modules=["q_proj"], router="learned")
    with pytest.raises(ValueError, match="router_metric"):
        config.router_metric = "discriminant"
    assert config.router_metric == "auto"


def test_abstain_spread_needs_the_prototype_router():
    with pytest.raises(ValueError, match="router_abstain_spread.*router='prototype'"):
        SpaRTAConfig(target_modules=["q_proj"], router="learned", router_abstain_spread=3.0)
