"""Quantized base layers (QLoRA-style training): which ones SpaRTA adapts, and how their weights are read and written.

SpaRTA adapts bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` layers and torchao int8 layers (an `nn.Linear` whose
weight is a torchao ``Int8Tensor``), the quantized layers PEFT's LoRA supports with merging. The base layer computes
its own output with its quantized kernel and the adapter adds its output to it, so the quantized weights are never
written while training. Spectral initialisation and merging read the weight dequantized, and merging writes it back
requantized, through PEFT's quantization backends (`peft.utils.quantization_utils`), which PEFT's own tuners use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Optional

import torch
from peft.utils import resolve_quantization_backend
from peft.utils.quantization_utils import Bnb4bitBackend, QuantizationBackend, TorchaoBackend
from torch import nn


#: What SpaRTA adapts, for the error on any other quantized layer.
SUPPORTED = (
    "bitsandbytes Linear4bit and Linear8bitLt, and torchao int8 (Int8Tensor weights, e.g. Int8WeightOnlyConfig)"
)

#: The packages whose layer or weight classes mark a layer as quantized.
QUANTIZATION_PACKAGES = ("bitsandbytes", "torchao", "auto_gptq", "gptqmodel", "awq", "optimum", "hqq")


def quantization_backend(
    layer: nn.Module, get_apply_tensor_subclass: Optional[Callable] = None
) -> Optional[QuantizationBackend]:
    """PEFT's quantization backend of a base layer: None for an unquantized layer, a clear error for a quantized one
    that SpaRTA does not adapt.

    ``get_apply_tensor_subclass``: torchao's requantization config (from the model's ``TorchAoConfig``), which merging
    needs; without it a torchao layer trains and saves but refuses to merge.
    """
    if not is_quantized(layer):
        return None
    backend = resolve_quantization_backend(
        layer, get_apply_tensor_subclass=get_apply_tensor_subclass or _unknown_requantization
    )
    if isinstance(backend, Bnb4bitBackend):
        backend = Bnb4bitUnpackingBackend()
    if (
        backend is None
        or backend.backend_name not in ("bnb 4bit", "bnb 8bit", "torchao")
        or not _is_int8_torchao(layer, backend)
    ):
        raise ValueError(
            f"Target module {layer} is a quantized layer ({type(layer).__module__}.{type(layer).__name__}, weight "
            f"{type(getattr(layer, 'weight', None)).__name__}) that SpaRTA cannot adapt; SpaRTA supports quantized base "
            f"layers of {SUPPORTED}. Load the base model with one of these (e.g. BitsAndBytesConfig(load_in_4bit=True)) "
            "or unquantized, or exclude this module from target_modules."
        )
    return backend


class Bnb4bitUnpackingBackend(Bnb4bitBackend):
    """PEFT's bitsandbytes 4-bit backend, which first undoes the repacking of bitsandbytes' CPU inference.

    On a CPU, bitsandbytes' first inference forward of a ``Linear4bit`` (eval mode, no gradient) repacks its weight
    in place into a layout that `dequantize_4bit` does not read; the layer's ``state_dict`` undoes it, and so does this
    backend before dequantizing (otherwise a merge after an inference forward is off by far more than rounding)."""

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        return super().get_base_weight(base_layer)


def is_quantized(layer: nn.Module) -> bool:
    """Whether a layer holds quantized weights: integer weights, or a layer class or weight tensor class from a
    quantization library's package (torchao keeps `nn.Linear` and swaps its weight for a tensor subclass whose dtype
    stays floating point)."""
    weight = getattr(layer, "weight", None)
    if weight is not None and not weight.dtype.is_floating_point:
        return True
    classes = [type(layer)] if weight is None else [type(layer), type(weight)]
    return any(cls.__module__.split(".")[0] in QUANTIZATION_PACKAGES for cls in classes)


def _is_int8_torchao(layer: nn.Module, backend: QuantizationBackend) -> bool:
    """True for any backend but torchao's; for torchao, whether the weight is int8 (PEFT merges no other kind)."""
    if not isinstance(backend, TorchaoBackend):
        return True
    from torchao.quantization import Int8Tensor

    return isinstance(layer.weight, Int8Tensor)


def _unknown_requantization():
    """Stands for torchao's requantization config where the model has none (quantized by hand with ``quantize_``);
    `check_mergeable` refuses to merge such a layer before anything changes."""
    raise AssertionError("check_mergeable refuses a torchao layer without its requantization config")


def check_mergeable(backend: Optional[QuantizationBackend], adapter_name: str) -> None:
    """Refuse, before anything changes, to merge into a quantized layer that cannot be requantized; warn that
    requantizing rounds."""
    if backend is None:
        return
    if isinstance(backend, TorchaoBackend) and backend.get_apply_tensor_subclass is _unknown_requantization:
        raise ValueError(
            f"Cannot merge SpaRTA adapter '{adapter_name}' into a torchao layer quantized without a TorchAoConfig: the "
            "merged weight could not be requantized as the base was. Load the base with from_pretrained(..., "
            "quantization_config=TorchAoConfig(...)), or merge into an unquantized copy of the base: load it "
            "unquantized, PeftModel.from_pretrained(base, adapter_dir), then merge_and_unload()."
        )
    warn_requantization(backend, adapter_name, "Merging")


def warn_requantization(backend: Optional[QuantizationBackend], adapter_name: str, action: str) -> None:
    """Warn, as PEFT's LoRA does, that ``action`` ("Merging", "Unmerging") a quantized layer rounds."""
    if backend is None:
        return
    warnings.warn(
        f"{action} SpaRTA adapter '{adapter_name}' with a {backend.backend_name} quantized layer dequantizes, adds and "
        "requantizes the weight: outputs may differ from the unmerged model's by rounding errors, and unmerging does "
        "not restore the base weights bit for bit. For an exact merge, merge into an unquantized copy of the base."
    )
