from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from transformers import Trainer
from transformers.integrations.peft import PeftAdapterMixin

import peft_sparta
from peft_sparta import SpaRTAConfig, SpaRTAModel
from tests.conftest import tiny_llama


def test_sparta_is_a_peft_type_by_attribute_value_and_name():
    assert PeftType.SPARTA is PeftType("SPARTA") is PeftType["SPARTA"]
    assert PeftType.SPARTA == "SPARTA"
    assert PeftType.SPARTA in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARTA] is SpaRTAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SPARTA"] is SpaRTAModel


def test_registration_is_idempotent():
    members = len(PeftType)
    patched = (Trainer.__init__, PeftModel.load_adapter, PeftModel.from_pretrained, PeftAdapterMixin.load_adapter)
    assert all(hasattr(method, "__wrapped__") for method in patched), "import peft_sparta wraps them"
    peft_sparta.registration.extend_str_enum(PeftType, "SPARTA")
    peft_sparta.registration.register_sparta(SpaRTAConfig, SpaRTAModel)
    peft_sparta.registration.install()
    assert len(PeftType) == members
    assert (Trainer.__init__, PeftModel.load_adapter, PeftModel.from_pretrained, PeftAdapterMixin.load_adapter) == (
        patched
    ), "a second install wraps nothing again"


def test_fresh_process_loads_after_import(tmp_path):
    model = get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=["q_proj"], r_shared=2, r_task=4))
    model.save_pretrained(tmp_path)
    script = f"""
import peft_sparta
from peft import PeftConfig, PeftModel
from tests.conftest import tiny_llama
config = PeftConfig.from_pretrained({str(tmp_path)!r})
assert type(config).__name__ == "SpaRTAConfig", type(config)
model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path)!r})
print(type(model.base_model).__name__)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SpaRTAModel"


def test_peft_config_from_pretrained(tmp_path):
    model = get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=["q_proj"], r_shared=2, r_task=4))
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SpaRTAConfig) and config.peft_type == PeftType.SPARTA
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), tmp_path).base_model, SpaRTAModel)


ENUM_CHECK = """
import enum, importlib.util, sys
source = open(sys.argv[1]).read()
namespace = {"__name__": "registration_alone"}
exec(source.split("from peft")[0] + source[source.index("def extend_str_enum"):source.index("def register_sparta")], namespace)

class Kind(str, enum.Enum):
    LORA = "LORA"

member = namespace["extend_str_enum"](Kind, "SPARTA")
assert namespace["extend_str_enum"](Kind, "SPARTA") is member
assert Kind.SPARTA is Kind("SPARTA") is Kind["SPARTA"] is member
assert Kind.SPARTA == "SPARTA" and "SPARTA" in list(Kind) and len(Kind) == 2
assert {Kind.SPARTA: 1}["SPARTA"] == 1
print("ok")
"""


def _find_python(version: str) -> str | None:
    """A working interpreter of that version: on PATH, or under pyenv (whose shims fail for non-global versions)."""
    candidates = [
        shutil.which(f"python{version}"),
        *glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_extension_on_every_supported_python(version):
    interpreter = _find_python(version)
    if interpreter is None:
        pytest.skip(f"python{version} is not installed here")
    source = Path(__file__).resolve().parents[1] / "peft_sparta" / "registration.py"
    result = subprocess.run([interpreter, "-c", ENUM_CHECK, str(source)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
