"""Exporting SpaRTA tasks as plain LoRA adapters, and routing requests to them with `TaskRouter`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparta import SpaRTAConfig, TaskRouter
from peft_sparta.continual import RoutingRecorder
from peft_sparta.export import SHARED_ONLY_FOLDER
from peft_sparta.export.__main__ import main as export_main
from tests.conftest import tiny_gpt2, tiny_llama


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_fc"]
TASKS = ["a", "b", "c"]


def task_batch(index: int) -> torch.Tensor:
    """Training prompts of task ``index``: tokens of its own range of the vocabulary."""
    generator = torch.Generator().manual_seed(index)
    return torch.randint(index * 30, index * 30 + 30, (3, 8), generator=generator)


def three_task_model(base, targets, **kwargs):
    """A SpaRTA model that learned tasks a, b and c, each on prompts of its own range of token ids."""
    kwargs = {"r_shared": 2, "r_task": 4, "init_weights": False, **kwargs}
    model = get_peft_model(base, SpaRTAConfig(target_modules=targets, task_names=["a"], **kwargs))
    for index, name in enumerate(TASKS):
        if index:
            model.add_task(name)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            batch = task_batch(index)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


def requests() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of tasks a, c and b (the second one left-padded) and one of tokens no task was trained on."""
    input_ids = torch.stack([task_batch(0)[0], task_batch(2)[1], task_batch(1)[2], torch.arange(89, 97)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


def logits(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


PLAIN_PEFT = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    input_file, output_file, *jobs = sys.argv[1:]
    input_ids = torch.load(input_file)
    outputs = {}
    for job in jobs:
        base, folder = job.split("=")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        with torch.no_grad():
            outputs[folder] = model(input_ids=input_ids).logits
    assert "peft_sparta" not in sys.modules
    torch.save(outputs, output_file)
    """
)


#: A Llama (nn.Linear) adapter with rsLoRA scales, and a GPT-2 (Conv1D, fan_in_fan_out) adapter without shared branch.
PLAIN_PEFT_CASES = {
    "llama": (tiny_llama, LLAMA_TARGETS, {"use_rslora": True}),
    "gpt2": (tiny_gpt2, GPT2_TARGETS, {"r_shared": 0}),
}


def test_each_folder_loads_with_plain_peft_and_equals_sparta_forced_to_its_task(tmp_path, input_ids):
    """In a process that never imports peft_sparta; the shared-only folder equals SpaRTA on inputs it abstains on.
    One process for both models, since starting one costs seconds."""
    expected, jobs = {}, []
    for case, (base, targets, settings) in PLAIN_PEFT_CASES.items():
        model = three_task_model(base(), targets, **settings)
        written = model.export_lora(tmp_path / case)
        assert written == {
            **{name: str(tmp_path / case / name) for name in TASKS},
            None: str(tmp_path / case / SHARED_ONLY_FOLDER),
        }
        for name in TASKS:
            model.set_task(name)
            expected[written[name]] = logits(model, input_ids)
        model.set_task(None)
        model.peft_config["default"].router_abstain_threshold = 1.0  # inputs unlike any training prompt abstain
        expected[written[None]] = logits(model, input_ids)
        assert all(not torch.equal(expected[written[None]], expected[written[name]]) for name in TASKS)
        base().save_pretrained(tmp_path / f"{case}_base")
        jobs += [f"{tmp_path / f'{case}_base'}={folder}" for folder in written.values()]

    torch.save(input_ids, tmp_path / "input_ids.pt")
    (tmp_path / "plain_peft.py").write_text(PLAIN_PEFT)
    command = [
        sys.executable,
        str(tmp_path / "plain_peft.py"),
        str(tmp_path / "input_ids.pt"),
        str(tmp_path / "out.pt"),
    ]
    subprocess.run([*command, *jobs], check=True, env={**os.environ, "PYTHONPATH": ""})
    outputs = torch.load(tmp_path / "out.pt")
    assert outputs.keys() == expected.keys()
    for folder, reference in expected.items():
        torch.testing.assert_close(outputs[folder], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_mixed_adapter_batch_with_the_routers_picks_reproduces_sparta(tmp_path, router):
    """PEFT's mixed-adapter batch, with TaskRouter's pick per row and the shared-only LoRA for abstaining rows, gives
    SpaRTA's routed output under top_k=1 and sequence routing (a strong router loss, so that the learned keys move
    to their tasks in two steps)."""
    settings = {"router_abstain_threshold": 0.5, "router_abstain_spread": None, "router_lambda": 10.0}
    model = three_task_model(tiny_llama(), LLAMA_TARGETS, router=router, top_k=1, **settings)
    input_ids, attention_mask = requests()
    expected = logits(model, input_ids, attention_mask)
    model.save_pretrained(tmp_path / "sparta")
    written = model.export_lora(tmp_path / "lora")

    task_router = TaskRouter.from_pretrained(tmp_path / "sparta", embeddings=tiny_llama().get_input_embeddings())
    picks = task_router.route(input_ids, attention_mask)
    assert picks == ["a", "c", "b", None]

    served = PeftModel.from_pretrained(tiny_llama(), written[None], adapter_name="shared_only")
    for name in TASKS:
        served.load_adapter(written[name], adapter_name=name)
    served.eval()
    adapter_names = [pick if pick is not None else "shared_only" for pick in picks]
    actual = logits(served, input_ids, attention_mask, adapter_names=adapter_names)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_task_router_decides_as_sparta_under_each_metric_floor_and_threshold(tmp_path):
    """One prototype per task, so that the training queries spread around it and the discriminant metric's query
    spread decides some of the random prompts (as it does in SpaRTA)."""
    model = three_task_model(tiny_llama(), LLAMA_TARGETS, top_k=1, router_prototypes=1)
    input_ids, attention_mask = requests()
    random_prompts = torch.randint(0, 97, (16, 8), generator=torch.Generator().manual_seed(3))
    input_ids = torch.cat([input_ids, random_prompts])
    attention_mask = torch.cat([attention_mask, torch.ones_like(random_prompts)])
    model.save_pretrained(tmp_path)
    router = TaskRouter.from_pretrained(tmp_path, embeddings=model.get_input_embeddings())
    settings = [("discriminant", "auto", None), ("cosine", "auto", None), ("cosine", None, 0.8), ("auto", 0.5, None)]
    decisions = []
    for metric, spread, threshold in settings:
        for config in (model.peft_config["default"], router.config):
            config.router_metric, config.router_abstain_spread = metric, spread
            config.router_abstain_threshold = threshold
        with RoutingRecorder(model, training=False) as recorder:
            logits(model, input_ids, attention_mask)
        gates = recorder.take()
        expected = [TASKS[int(row.argmax())] if row.amax() > 0 else None for row in gates]
        decisions.append(expected)
        assert router.route(input_ids, attention_mask) == expected, (metric, spread, threshold)
    assert len({tuple(decision) for decision in decisions}) > 1, "the settings change some decision"


def test_task_router_routes_by_the_tokens_the_attention_mask_keeps(tmp_path):
    """A prompt of task a after 24 padding positions that hold task b's tokens goes to task a, as in SpaRTA."""
    model = three_task_model(tiny_llama(), LLAMA_TARGETS, top_k=1)
    model.save_pretrained(tmp_path)
    router = TaskRouter.from_pretrained(tmp_path, embeddings=model.get_input_embeddings())
    input_ids = torch.cat([task_batch(1).flatten()[:24], task_batch(0)[0]])[None]
    attention_mask = (torch.arange(32) >= 24).long()[None]
    with RoutingRecorder(model, training=False) as recorder:
        logits(model, input_ids, attention_mask)
    assert recorder.take().argmax(dim=-1).tolist() == [0]
    assert router.route(input_ids, attention_mask) == ["a"]
    assert router.route(input_ids) != ["a"]


class CharacterTokenizer:
    """A tokenizer stand-in: one token per character, a start token 1."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1, *(ord(character) % 97 for character in text)]}


def test_route_texts_routes_the_tokenized_texts(tmp_path):
    model = three_task_model(tiny_llama(), LLAMA_TARGETS)
    model.save_pretrained(tmp_path)
    router = TaskRouter.from_pretrained(tmp_path, embeddings=model.get_input_embeddings())
    texts = ["".join(chr(token + 97) for token in task_batch(index)[0].tolist()) for index in range(3)] + ["x"]
    input_ids = torch.zeros(4, 9, dtype=torch.long)
    attention_mask = torch.zeros(4, 9, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = CharacterTokenizer()(text)["input_ids"]
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = torch.tensor(ids), 1
    assert router.route_texts(texts, CharacterTokenizer()) == router.route(input_ids, attention_mask)


def test_exported_configs_meet_vllms_rules(tmp_path):
    """One rank for every module, no rank or alpha pattern, no DoRA, no bias, no modules_to_save, rank <= 512, scale
    1 (the scales are in B), the SpaRTA adapter's target modules and base model."""
    model = three_task_model(tiny_gpt2(), GPT2_TARGETS, task_type="CAUSAL_LM")
    model.peft_config["default"].base_model_name_or_path = "org/base-model"
    written = model.export_lora(tmp_path)
    for name, folder in written.items():
        config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
        rank = 2 + (4 if name is not None else 0)
        assert config["peft_type"] == "LORA" and config["r"] == rank == config["lora_alpha"]
        assert not config["rank_pattern"] and not config["alpha_pattern"]
        assert not config["use_dora"] and not config["use_rslora"] and config["bias"] == "none"
        assert config["modules_to_save"] is None and config["r"] <= 512
        assert sorted(config["target_modules"]) == sorted(GPT2_TARGETS) and config["fan_in_fan_out"]
        assert config["base_model_name_or_path"] == "org/base-model" and config["task_type"] == "CAUSAL_LM"
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert len(weights) == 2 * 2 * 2  # lora_A and lora_B of two modules in two blocks
        assert all(tensor.shape[0 if key.endswith("lora_A.weight") else 1] == rank for key, tensor in weights.items())


def adapter_with(**settings):
    return get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=LLAMA_TARGETS, r_shared=2, r_task=4, **settings))


@pytest.mark.parametrize(
    "settings, call, message",
    [
        ({"task_names": ["a", "b"]}, {"tasks": ["a", "x"]}, "Unknown tasks \\['x'\\]"),
        ({"task_names": ["a", "b"]}, {"tasks": []}, "each task to export once"),
        ({"task_names": ["Task", "task"]}, {}, "differ only in case"),
        ({"task_names": ["a", "b"], "router_granularity": "token"}, {}, "routes per token"),
        ({"task_names": ["a", "b"], "router": "spectral"}, {}, "routes per token"),
        ({"task_branches": "shared", "router": "components", "shared_update": "train"}, {}, "paper design"),
        ({"bias": "all"}, {}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ],
)
def test_refused_exports_say_why_and_write_nothing(tmp_path, settings, call, message):
    model = adapter_with(**settings)
    with pytest.raises(ValueError, match=message):
        model.export_lora(tmp_path / "out", **call)
    assert not (tmp_path / "out").exists()


def test_task_names_that_are_no_plain_folder_names_are_written_percent_encoded(tmp_path):
    names = ["summarize/en", "_shared_only", "..", "Übersetzung", "a b"]
    written = adapter_with(task_names=names).export_lora(tmp_path)
    folders = {name: os.path.basename(path) for name, path in written.items()}
    assert folders == {
        "summarize/en": "summarize%2Fen",
        "_shared_only": "%5Fshared_only",
        "..": "%2E.",
        "Übersetzung": "%C3%9Cbersetzung",
        "a b": "a%20b",
        None: SHARED_ONLY_FOLDER,
    }
    assert sorted(os.listdir(tmp_path)) == sorted(folders.values())


def test_export_refuses_a_file_or_a_non_empty_folder_and_leaves_it_as_it_was(tmp_path):
    model = adapter_with()
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    for target, message in [("file", "is a file"), ("folder", "not empty")]:
        with pytest.raises(ValueError, match=message):
            model.export_lora(tmp_path / target)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and os.listdir(tmp_path / "folder") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert set(model.export_lora(tmp_path / "empty")) == {"task_0", None}


def test_single_task_token_routing_exports_its_one_lora(tmp_path, input_ids):
    """A single task without abstention is routed to whatever the granularity: the adapter is one LoRA."""
    model = adapter_with(router="spectral", init_weights=False)
    written = model.export_lora(tmp_path / "lora")
    served = PeftModel.from_pretrained(tiny_llama(), written["task_0"]).eval()
    torch.testing.assert_close(logits(served, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


def test_task_router_refuses_what_the_export_refuses(tmp_path):
    adapter_with(task_names=["a", "b"], router_granularity="token").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="routes per token"):
        TaskRouter.from_pretrained(tmp_path, embeddings=tiny_llama().get_input_embeddings())


def test_command_exports_a_saved_adapter(tmp_path, capsys):
    model = three_task_model(tiny_llama(), LLAMA_TARGETS)
    model.save_pretrained(tmp_path / "sparta")
    tiny_llama().save_pretrained(tmp_path / "base")
    arguments = [str(tmp_path / "sparta"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert export_main([*arguments, "--tasks", "c", "a"]) == 0
    summary = capsys.readouterr().out
    assert "Wrote 3 LoRA adapters" in summary and "max_lora_rank >= 6" in summary
    assert sorted(os.listdir(tmp_path / "out")) == sorted([SHARED_ONLY_FOLDER, "a", "c"])
    expected = model.export_lora(tmp_path / "from_model", tasks=["c", "a"])
    for name, folder in expected.items():
        exported = load_file(os.path.join(tmp_path / "out", os.path.basename(folder), "adapter_model.safetensors"))
        reference = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in exported)
