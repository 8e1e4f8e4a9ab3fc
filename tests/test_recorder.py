"""The routing recorder (peft_sparta/routers/recorder.py): scores, explicit start/stop, errors."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.nn import functional as F

from peft_sparta import SpaRTAConfig
from peft_sparta.routers.recorder import RoutingRecorder
from tests.conftest import tiny_llama


@pytest.fixture
def model():
    model = get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=["q_proj"], r_shared=2, r_task=4))
    model.train()
    model(input_ids=torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0)))
    return model.eval()


def _sequence_queries(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Sequence routing queries computed here from the input embeddings: unit mean over the positions."""
    with torch.no_grad():
        embedded = model.get_input_embeddings()(input_ids).float()
    return F.normalize(embedded.mean(dim=1), dim=-1)


def test_recorder_scores_are_the_router_similarities_and_bad_quantity_is_an_error(model):
    """Each training input seeded its own prototype (3 inputs, 16 prototypes per task), so an input's score is its
    best cosine similarity to the training inputs' queries, computed here without the router."""
    trained = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(7))
    with RoutingRecorder(model, quantity="scores") as recorder:
        model(input_ids=batch)
        model(input_ids=trained)
    scores = recorder.take()
    similarity = _sequence_queries(model, batch) @ _sequence_queries(model, trained).T
    expected = similarity.amax(dim=-1, keepdim=True)
    assert scores.shape == (7, 1)
    torch.testing.assert_close(scores[:4], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[4:], torch.ones(3, 1), atol=1e-5, rtol=0)
    assert (expected < 0.99).all(), "the new inputs are not copies of the training inputs"
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
