"""Model card and Hub upload up to the network boundary, loading from the Hub cache offline, and loads that fail
cleanly: a clear error and the model left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.utils import hub as transformers_hub

from peft_sparta import SpaRTAConfig, SpaRTALayer, SpaRTALoadError
from tests.conftest import tiny_llama
from tests.helpers import three_task_model


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    model = three_task_model()
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _card_checks(text: str) -> None:
    assert "library_name: peft" in text
    assert "- sparta" in text and "- continual-learning" in text
    assert "import peft_sparta" in text
    for task in ["`a`", "`b`", "`c`"]:
        assert task in text
    assert "rank 2" in text and "rank 4" in text


def test_save_pretrained_writes_the_sparta_model_card(saved):
    _, folder = saved
    _card_checks((folder / "README.md").read_text())


def test_push_to_hub_uploads_config_weights_and_card(monkeypatch, saved):
    model, _ = saved
    captured = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            captured["repo_id"] = repo_id
            captured["files"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            return "commit"

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", _offline_card)
    model.push_to_hub("user/sparta-demo")
    files = captured["files"]
    assert captured["repo_id"] == "user/sparta-demo"
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert json.loads(files["adapter_config.json"])["task_names"] == ["a", "b", "c"]
    _card_checks(files["README.md"].decode())


def _offline_card(repo_id, tags=None, token=None, ignore_metadata_errors=False):
    from huggingface_hub import ModelCard, ModelCardData

    return ModelCard.from_template(ModelCardData(tags=tags or []))


def test_load_from_hub_cache_offline(saved, tmp_path):
    model, folder = saved
    snapshot = tmp_path / "hub" / "models--user--sparta-demo" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "expected.pt")
    # the same thread count as here: CPU matmuls reduce in another order on another count, and equality is exact
    script = f"""
import torch, peft_sparta
from peft import PeftModel
from tests.conftest import tiny_llama
torch.set_num_threads({torch.get_num_threads()})
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = PeftModel.from_pretrained(tiny_llama(), "user/sparta-demo").eval()
with torch.no_grad():
    assert torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"])
print("ok")
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def _assert_untouched(base, ids, expected):
    assert not any(isinstance(m, SpaRTALayer) for m in base.modules())
    assert not base._forward_hooks and not base._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, expected)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _corrupt(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda f: _edit_config(f, format_version=99), ValueError, "Upgrade peft-sparta-cl"),
        (lambda f: _edit_config(f, task_names=["a", "b", "c", "d"]), SpaRTALoadError, "different saves"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), SpaRTALoadError, "holds no adapter weights"),
        (_corrupt, SpaRTALoadError, "files are complete"),
    ],
    ids=["newer-format", "task-names", "missing-weights", "corrupted-weights"],
)
def test_bad_adapter_fails_clearly_and_leaves_the_model_as_it_was(saved, input_ids, damage, error, message):
    _, folder = saved
    damage(folder)
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
    with pytest.raises(error, match=message):
        PeftModel.from_pretrained(base, folder)
    _assert_untouched(base, input_ids, expected)


def test_other_base_shapes_fail_clearly_and_leave_the_model_as_it_was(saved, input_ids):
    _, folder = saved
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
    with pytest.raises(SpaRTALoadError, match="other shapes"):
        PeftModel.from_pretrained(base, folder)
    _assert_untouched(base, input_ids, expected)


def test_failed_second_adapter_keeps_the_first(saved, input_ids):
    _, folder = saved
    model = get_peft_model(
        tiny_llama(), SpaRTAConfig(target_modules=["q_proj"], r_shared=2, r_task=4, init_weights=False)
    )
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    _corrupt(folder)
    with pytest.raises(SpaRTALoadError):
        model.load_adapter(folder, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("kwargs", [{"low_cpu_mem_usage": True}, {}])
def test_load_across_dtypes_and_low_cpu_mem_usage(saved, input_ids, kwargs):
    model, folder = saved
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    same = PeftModel.from_pretrained(tiny_llama(), folder, **kwargs).eval()
    with torch.no_grad():
        assert torch.equal(same(input_ids=input_ids).logits, expected)
    half = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), folder, **kwargs).eval()
    with torch.no_grad():
        assert torch.allclose(half(input_ids=input_ids).logits.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapter_moves_between_cpu_and_cuda(saved, tmp_path, input_ids):
    """Saved on CPU, loaded onto CUDA (device_map) and trained there, saved again, loaded back on CPU: every tensor
    lands on the model's device and the CUDA-trained adapter reloads on CPU to the same weights."""
    from safetensors.torch import load_file

    model, folder = saved
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    tiny_llama().save_pretrained(tmp_path / "base")
    base = type(tiny_llama()).from_pretrained(tmp_path / "base", device_map="cuda")
    on_gpu = PeftModel.from_pretrained(base, folder, is_trainable=True)
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    assert {b.device.type for b in on_gpu.buffers()} == {"cuda"}
    on_gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(input_ids=input_ids.cuda()).logits.cpu(), expected, atol=1e-4, rtol=1e-4)
    on_gpu.add_task("d")
    on_gpu.train()
    ids = input_ids.cuda()
    on_gpu(input_ids=ids, labels=ids).loss.backward()
    on_gpu.save_pretrained(tmp_path / "from_gpu")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "from_gpu")
    saved_weights = load_file(tmp_path / "from_gpu" / "adapter_model.safetensors")
    loaded = {k: v for k, v in back.state_dict().items() if "sparta_" in k}
    assert len(loaded) == len(saved_weights) and all(v.device.type == "cpu" for v in loaded.values())
    for key, value in saved_weights.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key


def test_load_into_a_base_model_loaded_with_device_map(saved, tmp_path, input_ids):
    model, folder = saved
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    tiny_llama().save_pretrained(tmp_path / "base")
    base = type(tiny_llama()).from_pretrained(tmp_path / "base", device_map="cpu")
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
