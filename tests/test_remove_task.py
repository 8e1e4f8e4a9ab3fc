"""remove_task: a task's branch and router state leave the adapter exactly, the others are untouched."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_sparta import SpaRTAConfig
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama
from tests.helpers import train_steps


def three_tasks(router: str) -> PeftModel:
    config = SpaRTAConfig(r_shared=2, r_task=4, target_modules=["q_proj", "v_proj"], router=router, task_names=["a"])
    model = get_peft_model(tiny_llama(), config)
    generator = torch.Generator().manual_seed(0)
    for index, name in enumerate(["a", "b", "c"]):
        if index:
            model.add_task(name)
        train_steps(model, torch.randint(index * 30 + 3, index * 30 + 30, (3, 8), generator=generator), steps=2)
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


TASK_LISTS = ("sparta_A_task.default.", "sparta_B_task.default.", "sparta_router.default.keys.")
ROUTER_ROWS = tuple(
    f"sparta_router.default.{name}" for name in ("prototypes", "counts", "query_scatter", "query_count")
)


def without_task(model: PeftModel, index: int) -> dict[str, torch.Tensor]:
    """The adapter's tensors with task ``index`` dropped, numbered as a model that never had it numbers them."""
    kept = {}
    for name, value in model.state_dict().items():
        if "sparta_" not in name:
            continue
        if any(marker in name for marker in TASK_LISTS):
            head, task = name.rsplit(".", 1)
            if int(task) == index:
                continue
            name = f"{head}.{int(task) - int(int(task) > index)}"
        elif name.endswith(ROUTER_ROWS):
            value = torch.cat([value[:index], value[index + 1 :]])
        kept[name] = value
    return kept


@pytest.mark.parametrize("router", ["prototype", "learned", "spectral"])
def test_removed_task_leaves_exactly_and_the_rest_is_untouched(tmp_path, router):
    model = three_tasks(router)
    ids = torch.randint(3, 97, (4, 8), generator=torch.Generator().manual_seed(7))
    model.set_task("c")
    task_c = logits(model, ids)
    model.set_task(None)
    expected_state = without_task(model, 1)

    model.remove_task("b")
    assert model.task_names == ["a", "c"]
    state = {name: value for name, value in model.state_dict().items() if "sparta_" in name}
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[name], expected_state[name]) for name in state)
    for layer in sparta_layers(model):
        assert layer.num_tasks("default") == 2
        assert not layer.sparta_A_task["default"][0].requires_grad
    model.set_task("c")
    assert torch.equal(logits(model, ids), task_c)

    model.set_task(None)
    routed = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.task_names == ["a", "c"]
    assert torch.equal(logits(loaded, ids), routed)


def test_removing_the_newest_task_makes_the_previous_one_current_and_unknown_or_last_task_is_an_error():
    model = three_tasks("prototype")
    model.train()
    model.remove_task("c")
    layer = sparta_layers(model)[0]
    assert layer.sparta_A_task["default"][1].requires_grad and not layer.sparta_A_task["default"][0].requires_grad
    with pytest.raises(ValueError, match="Unknown task"):
        model.remove_task("zzz")
    model.remove_task("a")
    with pytest.raises(ValueError, match="at least one task"):
        model.remove_task("b")
