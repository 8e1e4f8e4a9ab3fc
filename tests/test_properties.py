"""Property-based tests: every invalid config is rejected with a message naming the field; every valid config on
any layer shape builds, runs forward and backward, and round-trips save/load exactly."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from peft_sparta import SpaRTAConfig


INVALID = {
    "r_shared": st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.text(max_size=3)),
    "r_task": st.one_of(st.integers(max_value=0), st.booleans(), st.floats()),
    "alpha_shared": st.one_of(st.floats(max_value=0), st.text(max_size=3)),
    "alpha_task": st.floats(max_value=0),
    "dropout": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-6)),
    "init_weights": st.one_of(st.integers(), st.text(max_size=5).filter(lambda s: s != "spectral")),
    "router": st.text(max_size=8).filter(lambda s: s not in ("prototype", "learned", "spectral")),
    "router_granularity": st.text(max_size=8).filter(lambda s: s not in ("auto", "token", "sequence")),
    "router_dim": st.integers(max_value=0),
    "router_temperature": st.floats(max_value=0),
    "router_prototypes": st.integers(max_value=0),
    "top_k": st.integers(max_value=0),
    "router_abstain_threshold": st.one_of(
        st.floats(min_value=1.0, exclude_min=True), st.floats(max_value=-1.0, exclude_max=True), st.text(max_size=3)
    ),
    "router_abstain_spread": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.text(max_size=3)),
    "orth_lambda": st.floats(max_value=-1e-9),
    "orth_norm": st.text(max_size=4).filter(lambda s: s not in ("fro", "l1")),
    "router_lambda": st.floats(max_value=-1e-9),
    "shared_update": st.text(max_size=4),
    "task_names": st.one_of(st.just([]), st.lists(st.just("x"), min_size=2, max_size=3)),
}


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_every_invalid_value_is_rejected_naming_the_field(data):
    field = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(INVALID[field])
    try:
        SpaRTAConfig(target_modules=["lin"], **{field: value})
    except ValueError as error:
        assert field in str(error)
    else:
        raise AssertionError(f"{field}={value!r} was accepted")


class TwoLayers(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.lin = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


valid_configs = st.fixed_dictionaries(
    {
        "r_shared": st.integers(0, 5),
        "r_task": st.integers(1, 6),
        "alpha_shared": st.floats(0.5, 32),
        "alpha_task": st.floats(0.5, 64),
        "use_rslora": st.booleans(),
        "init_weights": st.sampled_from([True, False, "spectral"]),
        "router": st.sampled_from(["prototype", "learned", "spectral"]),
        "router_dim": st.one_of(st.none(), st.integers(1, 8)),
        "router_prototypes": st.integers(1, 3),
        "top_k": st.one_of(st.none(), st.integers(1, 3)),
        "router_abstain_threshold": st.one_of(st.none(), st.floats(-1.0, 1.0)),
        "orth_norm": st.sampled_from(["fro", "l1"]),
        "shared_update": st.sampled_from(["train", "freeze_after_first"]),
        "task_names": st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True),
    }
)


@given(
    options=valid_configs,
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 5)),
    batch=st.integers(1, 3),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_valid_config_builds_trains_and_round_trips(options, shape, batch):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(*shape), SpaRTAConfig(target_modules=["lin", "out"], **options))
    x = torch.randn(batch, shape[0])
    model.train()
    # the regularizers ride on the layer outputs: any loss of the outputs trains them
    model(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(TwoLayers(*shape), folder).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)
