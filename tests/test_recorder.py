"""The routing recorder (peft_sparta/routers/recorder.py): scores, explicit start/stop, errors."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_sparta import SpaRTAConfig
from peft_sparta.layer import sparta_layers
from peft_sparta.routers.recorder import RoutingRecorder
from tests.conftest import tiny_llama


@pytest.fixture
def model():
    model = get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=["q_proj"], r_shared=2, r_task=4))
    model.train()
    model(input_ids=torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0)))
    return model.eval()


def test_recorder_scores_are_the_router_similarities_and_bad_quantity_is_an_error(model):
    batch = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    layer = sparta_layers(model)[0]
    with RoutingRecorder(model, quantity="scores") as recorder:
        model(input_ids=batch)
    scores = recorder.take()
    query = model.base_model.routing_context.sequence_query
    assert scores.shape == (3, 1) and torch.allclose(scores, layer.router_scores("default", query.unsqueeze(1))[:, 0])
    assert (scores > 0.5).all(), "inputs score high against the prototypes built from them"
    with pytest.raises(ValueError, match="quantity"):
        RoutingRecorder(model, quantity="logits")


def test_start_and_stop_bound_the_recording(model):
    batch = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    recorder = RoutingRecorder(model)
    model(input_ids=batch)
    assert recorder.take().numel() == 0, "nothing is recorded before start()"
    recorder.start()
    recorder.start()  # a second start registers nothing more
    assert len(recorder._handles) == len(recorder.layers) + 1
    model(input_ids=batch)
    recorder.stop()
    assert recorder._handles == []
    model(input_ids=batch)
    gates = recorder.take()
    assert gates.shape == (2, 1) and torch.allclose(gates, torch.ones(2, 1))


def test_recorder_needs_sparta_layers():
    with pytest.raises(ValueError, match="SpaRTA layers"):
        RoutingRecorder(tiny_llama())
