"""Export a SpaRTA adapter as plain LoRA adapters, one per task, for the engines that serve LoRA (vLLM, TGI, LoRAX,
SGLang, PEFT itself) and know nothing of SpaRTA.

Under sequence routing with ``top_k=1`` an input's output is the base model plus the shared branch plus one task
branch, so each task is the LoRA of rank r_shared + r_task with A = [A_shared; A_task] and
B = [B_shared * scale_shared, B_task * scale_task] (``lora_alpha = r``: the scales are folded into B). An input the
router abstains on gets the shared branch alone, exported as a LoRA of its own. `peft_sparta.TaskRouter` makes the
routing decision in front of the engine.

``python -m peft_sparta.export SRC OUT`` exports a saved adapter (see `peft_sparta.export.__main__`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from typing import Optional, Union

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import SpaRTAConfig
from ..layer import SpaRTALayer
from ..variants import task_branch_variant


#: Folder of the shared branch alone (what SpaRTA applies to inputs its router abstains on). Task folders start with
#: a letter, a digit or "%" (`task_folder`), so no task can take this name.
SHARED_ONLY_FOLDER = "_shared_only"

#: Characters a task's folder keeps as they are (`task_folder`); the first one must also be a letter or a digit.
PLAIN_CHARACTER = re.compile(r"[A-Za-z0-9._-]")

#: The largest LoRA rank vLLM serves (its ``max_lora_rank``).
VLLM_MAX_LORA_RANK = 512

WEIGHTS_NAME = "adapter_model.safetensors"


def export_lora(
    tuner,
    save_directory: Union[str, os.PathLike],
    tasks: Optional[Union[str, Iterable[str]]] = None,
    adapter_name: Optional[str] = None,
    progressbar: bool = False,
) -> dict[Optional[str], str]:
    """Write each task of a SpaRTA adapter as a standard PEFT LoRA adapter, and the shared branch alone as another.

    ``save_directory/<task>/`` (the task's name made a safe folder name by `task_folder`) holds adapter_config.json
    and adapter_model.safetensors of a LoRA whose output equals SpaRTA forced to that task (`set_task`);
    ``save_directory/_shared_only/`` the LoRA of the shared branch alone, what SpaRTA applies to inputs its router
    abstains on (a rank-1 LoRA of zeros, i.e. the base model, when ``r_shared=0``). Every module gets the one rank
    r_shared + r_task, ``lora_alpha`` equals the rank, no bias, no ``modules_to_save``: what vLLM's loader accepts.
    ``tasks``: the task names to export (default: every task). Returns {task name: folder}, with the shared-only
    folder under the key None.

    Refused, with nothing written: the paper design (``task_branches="shared"``) and token routing (the output is a
    per-input mix that no single LoRA reproduces), trained biases or ``modules_to_save`` (vLLM takes neither), unknown
    tasks, task names whose folders differ only in case, and a ``save_directory`` that is a file or a non-empty
    folder.
    """
    adapter_name = tuner._adapter(adapter_name)
    config = tuner.peft_config[adapter_name]
    check_exportable_config(config)
    layers = {
        name: layer
        for name, layer in tuner.model.named_modules()
        if isinstance(layer, SpaRTALayer) and adapter_name in layer.sparta_A_task
    }
    first = next(iter(layers.values()))
    check_routing(config, first.sparta_router[adapter_name])
    names = _tasks_to_export(config, tasks)
    folder = _check_output_folder(save_directory)
    rank = config.r_shared + config.r_task
    if rank > VLLM_MAX_LORA_RANK:
        warnings.warn(
            f"The exported LoRAs have rank {rank} (r_shared + r_task); vLLM serves ranks up to {VLLM_MAX_LORA_RANK}.",
            stacklevel=2,
        )
    written: dict[Optional[str], str] = {}
    for name in tqdm([*names, None], desc="Exporting LoRA adapters", disable=not progressbar):
        task = None if name is None else config.task_names.index(name)
        path = os.path.join(folder, SHARED_ONLY_FOLDER if name is None else task_folder(name))
        weights = {
            key: tensor
            for module_name, layer in layers.items()
            for key, tensor in lora_weights(layer, adapter_name, task, module_name).items()
        }
        folder_rank = next(iter(weights.values())).shape[0]
        os.makedirs(path)
        save_file(weights, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config(config, layers.values(), folder_rank).save_pretrained(path)
        written[name] = path
    return written


def check_exportable_config(config: SpaRTAConfig) -> None:
    """Refuse what no plain LoRA that vLLM accepts reproduces: the paper design, trained biases, modules_to_save."""
    task_branch_variant(config).check_lora_export(config)
    if config.bias != "none":
        raise ValueError(
            f"Cannot export an adapter with bias={config.bias!r} as LoRA: it trained the base model's biases, which "
            "the LoRA adapters that vLLM serves cannot carry (bias must be 'none'). Serve it with peft_sparta, or "
            "merge a task into the base model (set_task + merge_and_unload)."
        )
    if config.modules_to_save:
        raise ValueError(
            f"Cannot export an adapter with modules_to_save={sorted(config.modules_to_save)} as LoRA: the LoRA "
            "adapters that vLLM serves cannot carry whole trained modules. Serve it with peft_sparta, or merge a "
            "task into the base model (set_task + merge_and_unload)."
        )


def check_routing(config: SpaRTAConfig, router) -> None:
    """Refuse token routing, under which an input's tokens go to different task branches (one LoRA per input cannot
    do that), unless the router sends every input to its single task."""
    if router.granularity == "sequence" or router._is_constant(len(config.task_names)):
        return
    raise ValueError(
        f"Cannot export an adapter that routes per token (router={config.router!r}, router_granularity="
        f"{config.router_granularity!r}) as LoRA: every token of an input picks its own task branch, a per-input mix "
        "that no single LoRA reproduces. Only sequence routing (one task per input, router_granularity 'sequence' or "
        "'auto' with the prototype or learned router) exports; serve this adapter with peft_sparta."
    )


def lora_weights(
    layer: SpaRTALayer, adapter_name: str, task: Optional[int], module_name: str
) -> dict[str, torch.Tensor]:
    """The LoRA tensors, under PEFT's saved key names, of one layer with the shared branch and task branch ``task``
    (None: the shared branch alone): A = [A_shared; A_task], B = [B_shared * scale_shared, B_task * scale_task]."""
    down, up = [], []
    if adapter_name in layer.sparta_A_shared:
        down.append(layer.sparta_A_shared[adapter_name])
        up.append(layer.sparta_B_shared[adapter_name].float() * layer.scaling_shared[adapter_name])
    if task is not None:
        down.append(layer.sparta_A_task[adapter_name][task])
        up.append(layer.sparta_B_task[adapter_name][task].float() * layer.scaling_task[adapter_name])
    if not down:  # no shared branch: the shared-only LoRA is the base model
        reference = layer.sparta_A_task[adapter_name][0]
        down.append(reference.new_zeros(1, layer.in_features))
        up.append(reference.new_zeros(layer.out_features, 1))
    a = torch.cat([block.detach() for block in down])
    b = torch.cat([block.detach() for block in up], dim=1).to(a.dtype)
    prefix = f"base_model.model.{module_name}"
    return {f"{prefix}.lora_A.weight": a.cpu().contiguous(), f"{prefix}.lora_B.weight": b.cpu().contiguous()}


def lora_config(config: SpaRTAConfig, layers: Iterable[SpaRTALayer], rank: int) -> LoraConfig:
    """The LoRA config of an exported folder: one rank, ``lora_alpha = r`` (scale 1, the scales are in B), no bias,
    no modules_to_save, the SpaRTA adapter's target modules and base model."""
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        lora_dropout=config.dropout,
        fan_in_fan_out=all(layer.fan_in_fan_out for layer in layers),
        bias="none",
        use_rslora=False,
        modules_to_save=None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )


def _tasks_to_export(config: SpaRTAConfig, tasks: Optional[Union[str, Iterable[str]]]) -> list[str]:
    names = list(config.task_names) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [name for name in names if name not in config.task_names]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; the adapter's tasks are {config.task_names}.")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"tasks must name each task to export once (or be None for every task), got {names!r}.")
    folded = [task_folder(name).lower() for name in names]
    clashes = sorted({name for name in names if folded.count(task_folder(name).lower()) > 1})
    if clashes:
        raise ValueError(
            f"Task names {clashes} differ only in case, so their folders would clash on case-insensitive file "
            "systems; export them to separate folders (tasks=[...])."
        )
    too_long = [name for name in names if len(task_folder(name).encode()) > 255]
    if too_long:
        raise ValueError(f"Task names {too_long} make folder names longer than 255 bytes; export the other tasks.")
    return names


def task_folder(name: str) -> str:
    """The folder of task ``name``: the name, with each character other than letters, digits, ".", "_" and "-", and
    a first character other than a letter or digit, written as "%" and the hex of its UTF-8 bytes (as in URLs):
    "summarize/en" -> "summarize%2Fen", "_x" -> "%5Fx". Distinct names give distinct folders, none of them
    `SHARED_ONLY_FOLDER`."""

    def plain(character: str, first: bool) -> bool:
        return bool(PLAIN_CHARACTER.fullmatch(character)) and (not first or character.isalnum())

    return "".join(
        character if plain(character, index == 0) else "".join(f"%{byte:02X}" for byte in character.encode())
        for index, character in enumerate(name)
    )


def _check_output_folder(save_directory: Union[str, os.PathLike]) -> str:
    folder = os.fspath(save_directory)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"Cannot export to {folder!r}: it is a file. Pass a new or empty folder.")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(
            f"Cannot export to {folder!r}: the folder is not empty, and the export would mix with its files. Pass a "
            "new or empty folder."
        )
    return folder
