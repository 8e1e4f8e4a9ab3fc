"""Timing and memory helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager

import torch


def machine() -> str:
    """One line naming the device the figures come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(step, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def saved_activation_bytes(model: torch.nn.Module):
    """Count the bytes autograd saves for backward inside the block (activation memory, on any device): each storage
    once, and none of the model's parameters, which autograd keeps by reference at no extra cost."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    total = {"bytes": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
    total["bytes"] = sum(storages.values())


def peak_memory_bytes(step, device: torch.device, model: torch.nn.Module) -> int:
    """Peak memory of one ``step()``: allocator peak on CUDA, saved activations elsewhere."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with saved_activation_bytes(model) as total:
        step()
    return total["bytes"]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
