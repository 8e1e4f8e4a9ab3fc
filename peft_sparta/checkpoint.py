"""What a saved SpaRTA adapter must hold to load: keys of older format versions mapped to today's, and the checks
that turn a mismatch between config and weights into a `SpaRTALoadError` naming the problem."""

from __future__ import annotations

import torch

from .config import COSINE_QUERY_SCATTER_FORMAT_VERSION, PER_TASK_QUERY_SCATTER_FORMAT_VERSION, SpaRTAConfig
from .errors import SpaRTALoadError
from .variants import task_branch_variant


#: Checkpoint keys of the router state in format version 1, and their names since the routers own their state.
VERSION_1_ROUTER_KEYS = {
    ".sparta_prototypes": ".sparta_router.prototypes",
    ".sparta_prototype_counts": ".sparta_router.counts",
    ".sparta_router_keys.": ".sparta_router.keys.",
}


def current_key(key: str) -> str:
    """The name a checkpoint key of an older format version has today."""
    for old, new in VERSION_1_ROUTER_KEYS.items():
        if old in key:
            return key.replace(old, new)
    return key


def drop_per_layer_router_copies(checkpoint: dict, expected: dict, config: SpaRTAConfig) -> dict:
    """Format versions 1-2 stored the sequence router's state in every adapted layer; keep the copy of the layer that
    holds it now (every copy is the same)."""
    if config.format_version >= 3:
        return checkpoint
    return {key: value for key, value in checkpoint.items() if ".sparta_router." not in key or key in expected}


def add_missing_query_spread(checkpoint: dict, expected: dict, config: SpaRTAConfig) -> dict:
    """Adapters before version 6 may lack the query spread: versions before 5 kept none, and version 5 kept it only
    when the router was built with the discriminant metric. Such an adapter loads with a zero ``query_scatter`` and
    ``query_count``, under which the discriminant metric whitens by the prototypes' spread alone, as it did then."""
    if config.format_version >= COSINE_QUERY_SCATTER_FORMAT_VERSION:
        return checkpoint
    spread = {
        key: torch.zeros_like(value)
        for key, value in expected.items()
        if ".sparta_router." in key and key.endswith((".query_scatter", ".query_count")) and key not in checkpoint
    }
    return {**checkpoint, **spread}


def split_pooled_query_spread(checkpoint: dict, config: SpaRTAConfig) -> dict:
    """Versions before 7 kept the prototype router's query spread pooled over the tasks (``query_scatter`` (d, d),
    ``query_count`` ()); today each task keeps its own. A pooled spread loads as every task's, each task counting its
    prototypes' queries: the pooled mean, and so the routing, is what it was. Only removing a task of such an adapter
    differs from an adapter saved today: the spread stays as it was (the task's share cannot be told apart)."""
    if config.format_version >= PER_TASK_QUERY_SCATTER_FORMAT_VERSION:
        return checkpoint
    split = dict(checkpoint)
    for key, scatter in checkpoint.items():
        if key.rpartition(".")[2] == "query_scatter" and scatter.dim() == 2:
            prefix = key[: -len("query_scatter")]
            counts = checkpoint[prefix + "counts"]
            split[key] = scatter.expand(counts.shape[0], *scatter.shape).clone()
            split[prefix + "query_count"] = counts.sum(dim=-1)
    return split


def check_task_count(checkpoint: dict, config: SpaRTAConfig) -> None:
    """The checkpoint (keys without adapter name) holds one branch per task that the config names, or with
    ``task_branches="shared"`` one block of router components per task (see `TaskBranchVariant`)."""
    variant = task_branch_variant(config)
    saved_tasks = {int(m.group(1)) for key in checkpoint if (m := variant.checkpoint_task_key.search(key))}
    if saved_tasks and len(saved_tasks) != len(config.task_names):
        raise SpaRTALoadError(
            f"The adapter config names {len(config.task_names)} tasks ({', '.join(config.task_names)}) but its "
            f"weights hold {len(saved_tasks)} {variant.checkpoint_task_tensors}: adapter_config.json and the "
            "weights file come from different saves. Save the adapter again, or restore the matching files."
        )


def check_checkpoint(expected: dict, checkpoint: dict, config: SpaRTAConfig) -> None:
    """Every tensor the config creates is in the checkpoint with its shape, and the checkpoint holds no SpaRTA tensor
    that the config does not create (it would be dropped and the outputs would change)."""
    unexpected = sorted(key for key in checkpoint if ".sparta_" in key and key not in expected)
    if unexpected:
        raise SpaRTALoadError(
            f"The adapter's weights hold {len(unexpected)} SpaRTA tensors that its config does not create, e.g. "
            f"{unexpected[0]}: adapter_config.json was edited (target_modules, ranks, task_names) or comes from "
            "another save. Restore the config that was saved with these weights."
        )
    missing = sorted(set(expected) - set(checkpoint))
    if missing:
        raise SpaRTALoadError(
            f"The adapter's weights lack {len(missing)} tensors that its config requires, e.g. {missing[0]}: the "
            "weights file is incomplete or was saved for other target modules."
        )
    mismatched = [
        f"{key}: checkpoint {tuple(checkpoint[key].shape)}, model {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(checkpoint[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise SpaRTALoadError(
            "The adapter was saved for a base model whose adapted layers have other shapes; load it into the base "
            "model it was trained on. Mismatches: " + "; ".join(mismatched[:3])
        )
    check_router_values(checkpoint)


def check_router_values(checkpoint: dict) -> None:
    """The router state holds finite numbers and non-negative counts: a damaged value would load without complaint
    and fail, or route wrongly, at the first forward."""
    for key, value in sorted(checkpoint.items()):
        if ".sparta_router." not in key:
            continue
        if value.is_floating_point() and not torch.isfinite(value).all():
            problem = "is not finite (NaN or inf)"
        elif not value.is_floating_point() and (value < 0).any():
            problem = "holds negative counts"
        else:
            continue
        raise SpaRTALoadError(
            f"The adapter's router tensor {key} {problem}: the weights file is damaged or was edited. Restore it from "
            "the save that wrote it, or train and save the adapter again."
        )
