"""Whole SpaRTA models: the fused backends against the eager per-branch path, for every router mode, token and
sequence routing and several task counts; forward output and the gradient of the input and of every trainable
parameter (shared and current-task branches, learned router keys)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_sparta import SpaRTAConfig
from tests.conftest import tiny_llama


# fp32 throughout: the layers differ from the eager path only in summation order (1e-5, see TOLERANCES), which the
# attention and MLP that follow amplify by up to about 10x in the logits and the input gradient.
MODEL_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
ROUTINGS = [
    ("prototype", "token"),
    ("prototype", "sequence"),
    ("learned", "token"),
    ("learned", "sequence"),
    ("spectral", "token"),
]


def task_inputs(task: int) -> torch.Tensor:
    """Token ids from a band of the vocabulary of its own, so that the router has something to tell apart."""
    generator = torch.Generator().manual_seed(task)
    return torch.randint(task * 24, task * 24 + 24, (2, 6), generator=generator)


def model_with_tasks(router: str, granularity: str, n_tasks: int):
    """A tiny Llama with ``n_tasks`` branches (random B's, so every branch contributes), each task's router state
    built from its own inputs while it was the current task."""
    config = SpaRTAConfig(
        r_shared=2,
        r_task=3,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_weights=False,
        router=router,
        router_granularity=granularity,
        task_names=["t0"],
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    for task in range(n_tasks):
        if task:
            model.add_task(f"t{task}")
        model.train()
        with torch.no_grad():
            model(input_ids=task_inputs(task))
    return model


def output_and_gradients(model, inputs_embeds: torch.Tensor, cotangent: torch.Tensor):
    """Logits and the gradients of the input embeddings and of every trainable parameter, after backward of
    <logits, cotangent>."""
    model.zero_grad(set_to_none=True)
    embeds = inputs_embeds.detach().clone().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    (logits * cotangent).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), embeds.grad, grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n_tasks", [1, 2, 4])
@pytest.mark.parametrize("router,granularity", ROUTINGS)
def test_fused_model_matches_eager(backend, router, granularity, n_tasks, training, monkeypatch):
    model = model_with_tasks(router, granularity, n_tasks)
    model.train(training)
    ids = torch.cat([task_inputs(task) for task in range(n_tasks)])
    inputs_embeds = model.get_input_embeddings()(ids).detach()
    cotangent = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))

    monkeypatch.setenv("SPARTA_KERNEL_BACKEND", "eager")
    expected_logits, expected_input_grad, expected_grads = output_and_gradients(model, inputs_embeds, cotangent)
    monkeypatch.setenv("SPARTA_KERNEL_BACKEND", backend)
    logits, input_grad, grads = output_and_gradients(model, inputs_embeds, cotangent)

    tolerance = MODEL_TOLERANCE
    torch.testing.assert_close(logits, expected_logits, **tolerance)
    torch.testing.assert_close(input_grad, expected_input_grad, **tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        if expected is None:
            assert grads[name] is None, f"{name} got a gradient the eager path does not give"
        else:
            torch.testing.assert_close(grads[name], expected, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    if router == "learned" and n_tasks > 1 and not training:
        current_key = [name for name in grads if ".sparta_router." in name and ".keys." in name]
        assert current_key and all(grads[name] is not None for name in current_key), "the router keys get gradients"
