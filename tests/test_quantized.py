"""SpaRTA on quantized bases (QLoRA-style), on the CPU with the real libraries: bitsandbytes 4-bit (NF4) and 8-bit,
torchao int8. Skipped where the library cannot load."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import hub as transformers_hub

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig
from peft_sparta.layer import sparta_layers
from tests.conftest import Rows


# 64 and 128 wide: bitsandbytes' CPU inference repacks 4-bit weights in blocks of 64 input features
LLAMA = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
TASK_A = torch.randint(0, 20, (4, 10), generator=torch.Generator().manual_seed(2))
TASK_B = torch.randint(20, 40, (4, 10), generator=torch.Generator().manual_seed(3))
UNRELATED = torch.randint(60, 90, (4, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _quiet_int8_matmul():
    # bitsandbytes' 8-bit matmul says on every call that it casts float32 inputs to float16
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        yield


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny random Llama saved unquantized, to be loaded quantized by from_pretrained."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def quantization_config(kind: str):
    if kind == "torchao":
        torchao = pytest.importorskip("torchao.quantization")
        from transformers import TorchAoConfig

        return TorchAoConfig(torchao.Int8WeightOnlyConfig())
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_quantized(path, kind: str):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(kind), device_map="cpu")


def train(model, batch: torch.Tensor, steps: int = 3) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch).logits


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's own state (the quantized weights and their statistics), copied, under the base's keys."""
    state = model.state_dict().items()
    return {key.replace(".base_layer", ""): value.clone() for key, value in state if "sparta_" not in key}


@pytest.mark.parametrize(("kind", "backend"), [("4bit", "eager"), ("4bit", "torch"), ("8bit", "torch")])
def test_tasks_train_route_and_reload_on_a_quantized_base(saved_llama, tmp_path, kind, backend):
    """The full continual cycle on a base prepared by prepare_model_for_kbit_training (gradient checkpointing on):
    each task's loss falls, the quantized weights never change, the first task's forced output survives the second
    task's training and the removal of a task, and a fresh quantized base reloads the adapter to the same logits."""
    base = prepare_model_for_kbit_training(load_quantized(saved_llama, kind))
    before = base_state(base)
    config = SpaRTAConfig(r_shared=2, r_task=4, target_modules=TARGETS, task_names=["a"], kernel_backend=backend)
    model = get_peft_model(base, config)
    layer = sparta_layers(model)[0]
    assert type(layer.get_base_layer()).__name__ == ("Linear4bit" if kind == "4bit" else "Linear8bitLt")
    losses = train(model, TASK_A)
    assert losses[-1] < losses[0], losses
    # compared before any inference forward: bitsandbytes' CPU inference repacks 4-bit weights (not bit for bit)
    state = base_state(model.get_base_model())
    assert state.keys() == before.keys()
    assert all(torch.equal(state[key], before[key]) for key in before), "the quantized base weights changed"
    model.set_task("a")
    forced_a = logits(model, TASK_A)
    model.add_task("b")
    losses = train(model, TASK_B)
    assert losses[-1] < losses[0], losses
    model.set_task("a")
    assert torch.equal(logits(model, TASK_A), forced_a)
    model.set_task(None)
    routed = logits(model, torch.cat([TASK_A, TASK_B]))

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path / "adapter").eval()
    # within float rounding, as on an unquantized base after training two tasks
    torch.testing.assert_close(logits(reloaded, torch.cat([TASK_A, TASK_B])), routed, rtol=0, atol=1e-5)
    reloaded.remove_task("b")
    reloaded.set_task("a")
    torch.testing.assert_close(logits(reloaded, TASK_A), forced_a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["4bit", "8bit", "torchao"])
def test_merge_into_a_quantized_base_is_within_its_rounding(saved_llama, kind):
    """Merging dequantizes, adds and requantizes, as PEFT's LoRA does, with its rounding warning: the merged model is
    off the unmerged one by no more than quantizing moves the base, unmerging (requantizing again) by no more than
    twice that, and merge_and_unload leaves the layer quantized. The unmerged
    logits are computed first, so that on a 4-bit base the merge reads a weight that bitsandbytes' CPU inference has
    repacked."""
    torch.manual_seed(0)
    model = get_peft_model(load_quantized(saved_llama, kind), SpaRTAConfig(target_modules=TARGETS, init_weights=False))
    model.eval()
    unmerged = logits(model, TASK_A)
    with model.disable_adapter():
        base = logits(model, TASK_A)
    quantization_error = (base - logits(LlamaForCausalLM.from_pretrained(saved_llama), TASK_A)).abs().max()
    assert (unmerged - base).abs().max() > 4 * quantization_error, (
        "the adapter's effect must stand out of the rounding"
    )
    quantized_class = type(sparta_layers(model)[0].get_base_layer().weight)
    with pytest.warns(UserWarning, match="Merging .* rounding errors"):
        model.merge_adapter()
    merge_error = (logits(model, TASK_A) - unmerged).abs().max()
    assert merge_error < 1.5 * quantization_error, (merge_error, quantization_error)
    with pytest.warns(UserWarning, match="Unmerging .* rounding errors"):
        model.unmerge_adapter()
    unmerge_error = (logits(model, TASK_A) - unmerged).abs().max()
    assert unmerge_error < 2 * quantization_error, (unmerge_error, quantization_error)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged_model = model.merge_and_unload()
    assert type(merged_model.model.layers[0].self_attn.q_proj.weight) is quantized_class


def test_torchao_base_quantized_by_hand_trains_but_refuses_to_merge(saved_llama):
    """Without a TorchAoConfig the requantization config is unknown: merging is refused before anything changes."""
    torchao = pytest.importorskip("torchao.quantization")
    base = LlamaForCausalLM.from_pretrained(saved_llama)
    torchao.quantize_(base, torchao.Int8WeightOnlyConfig())
    model = get_peft_model(base, SpaRTAConfig(target_modules=TARGETS, task_names=["a"]))
    losses = train(model, TASK_A)
    assert losses[-1] < losses[0], losses
    layers = sparta_layers(model)
    before = [layer.get_base_layer().weight.dequantize() for layer in layers]
    trained = logits(model, TASK_A)
    with pytest.raises(ValueError, match="merge into an unquantized copy of the base"):
        model.merge_adapter()
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.get_base_layer().weight.dequantize(), w) for layer, w in zip(layers, before))
    assert torch.equal(logits(model, TASK_A), trained)


def test_spectral_initialisation_reads_the_dequantized_weight(saved_llama):
    bnb = pytest.importorskip("bitsandbytes")
    model = get_peft_model(
        load_quantized(saved_llama, "4bit"), SpaRTAConfig(r_shared=2, target_modules=TARGETS, init_weights="spectral")
    )
    layer = sparta_layers(model)[0]
    weight = layer.get_base_layer().weight
    _, _, vh = torch.linalg.svd(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float())
    shared = layer.sparta_A_shared["default"]
    torch.testing.assert_close(shared.abs(), vh[:2].abs(), atol=1e-5, rtol=0)


def test_router_abstains_on_a_quantized_base(saved_llama):
    """Inputs near no task get the quantized base's own output."""
    config = SpaRTAConfig(
        r_shared=0, target_modules=TARGETS, task_names=["a"], router_abstain_threshold=0.6, router_abstain_spread=None
    )
    model = get_peft_model(load_quantized(saved_llama, "4bit"), config)
    train(model, TASK_A, steps=2)
    with model.disable_adapter():
        base_unrelated, base_task = logits(model, UNRELATED), logits(model, TASK_A)
    assert torch.equal(logits(model, UNRELATED), base_unrelated)
    assert not torch.allclose(logits(model, TASK_A), base_task)


def test_trainer_with_gradient_checkpointing_on_a_4bit_base(saved_llama, tmp_path):
    base = prepare_model_for_kbit_training(load_quantized(saved_llama, "4bit"))
    model = get_peft_model(base, SpaRTAConfig(r_shared=2, r_task=4, target_modules=TARGETS))
    rows = [{"input_ids": row, "labels": row} for row in TASK_A.repeat(2, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        gradient_checkpointing=True,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_push_to_hub_from_a_4bit_base_reloads_onto_a_fresh_one(saved_llama, tmp_path, monkeypatch):
    """push_to_hub uploads the adapter alone (no quantized base weights), and the uploaded files load onto a fresh
    4-bit base to the same routed logits."""
    model = get_peft_model(load_quantized(saved_llama, "4bit"), SpaRTAConfig(target_modules=TARGETS, task_names=["a"]))
    train(model, TASK_A, steps=2)
    model.add_task("b")
    train(model, TASK_B, steps=2)
    routed = logits(model, torch.cat([TASK_A, TASK_B]))
    uploaded = tmp_path / "hub"

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.mkdir()
            for operation in operations:
                (uploaded / operation.path_in_repo).write_bytes(Path(operation.path_or_fileobj).read_bytes())
            return "commit"

    def offline_card(repo_id, tags=None, token=None, ignore_metadata_errors=False):
        return ModelCard.from_template(ModelCardData(tags=tags or []))

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", offline_card)
    model.push_to_hub("user/sparta-4bit")
    assert {path.name for path in uploaded.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    reloaded = PeftModel.from_pretrained(load_quantized(saved_llama, "4bit"), uploaded).eval()
    torch.testing.assert_close(logits(reloaded, torch.cat([TASK_A, TASK_B])), routed, rtol=0, atol=1e-5)
