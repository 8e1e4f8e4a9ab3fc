"""The methods a continual benchmark compares: SpaRTA (and its ablations) and the PEFT baselines.

A `Method` wraps a base model and does its per-task step; `peft_sparta.continual.train_sequence` runs any of them on
the same data, steps and trainable rank. Baselines (r = r_shared + r_task, the rank SpaRTA trains per task):

- ``seq_lora``: one PEFT LoRA of rank r trained on every task in turn (the forgetting reference).
- ``o_lora``: O-LoRA (Wang et al., 2023): a new PEFT LoRA adapter of rank r per task, all adapters active so their
  outputs sum, old ones frozen, plus O-LoRA's orthogonality loss 0.5 * sum_layers |A_old A_new^T| (element-wise
  absolute sum over the stacked old down-projections, as in O-LoRA's code).
- ``osf``: PEFT's OSF tuner: every target weight is split by SVD, the top min(out, in) - r singular directions are
  frozen and the rest (rank r) is trained; between tasks the model is merged and decomposed again.
  ``osf_progressive``: OSF with the progressive budget of PEFT's OSF continual-learning example (the preserved rank
  grows by r per task, so task t of T trains rank r * (T - t), at most half the layer).
- ``mtl_lora``: one LoRA of rank r trained on all tasks at once (the multi-task upper bound).
- ``sparta``: SpaRTA with the package defaults; ``sparta_<ablation>`` changes one thing, see `METHODS`.
- ``sparta_paper``: the paper design of the authors' public code (``task_branches="shared"``, `PAPER_DESIGN`): a
  low-rank (r_shared) and a high-rank (r_task) branch trained on every task, the component router, stochastic
  restoration every 10 steps; ``sparta_paper_no_restore`` and ``sparta_paper_no_subspace`` (orth_lambda 0) are its
  ablations. It has no per-task branches to route to, so no routing accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, OSFConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_sparta.continual.methods import Method, SpaRTAMethod
from peft_sparta.layer import sparta_layers
from peft_sparta.routers import Router, Routing


__all__ = [
    "METHODS",
    "PAPER_DESIGN",
    "AllBranchesRouter",
    "LoRAMethod",
    "OLoRAMethod",
    "OSFMethod",
    "SpaRTANoRouterMethod",
    "make_method",
]


@dataclass
class SpaRTANoRouterMethod(SpaRTAMethod):
    """No-router ablation: every SpaRTA layer computes all its task branches with gate 1 (their outputs sum, as
    O-LoRA's adapters do), in training and at inference; old branches stay frozen. SpaRTA has no config for this
    (the router is the method), so the benchmark installs `AllBranchesRouter` in place of each layer's router."""

    routes: bool = False

    def build(self, base_model, task_names):
        model = super().build(base_model, task_names)
        for layer in sparta_layers(model):
            for adapter_name, router in layer.sparta_router.items():
                layer.sparta_router[adapter_name] = AllBranchesRouter(
                    router.config, router.granularity, router.query_dim
                )
        return model


class AllBranchesRouter(Router):
    """Routes every input to every task branch with gate 1, in training and at inference."""

    def route(self, x, context, branches, training):
        return Routing(list(range(len(branches))))

    def scores(self, queries, branches):
        return queries.new_zeros(*queries.shape[:-1], len(branches))


def _lora_config(target_modules, rank: int, alpha: float, task_type=None):
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, task_type=task_type)


@dataclass
class LoRAMethod(Method):
    """Sequential LoRA (one adapter trained on every task in turn), or multi-task LoRA with ``multitask=True``."""

    name: str = "seq_lora"
    target_modules: Any = None
    rank: int = 40
    alpha: float = 80
    multitask: bool = False
    task_type: str | None = None

    def build(self, base_model, task_names):
        return get_peft_model(base_model, _lora_config(self.target_modules, self.rank, self.alpha, self.task_type))


@dataclass
class OLoRAMethod(Method):
    """O-LoRA: one LoRA adapter per task, all active (outputs sum), old ones frozen, l1 orthogonality to old A's."""

    name: str = "o_lora"
    target_modules: Any = None
    rank: int = 40
    alpha: float = 80
    orth_lambda: float = 0.5
    task_type: str | None = None

    def build(self, base_model, task_names):
        config = _lora_config(self.target_modules, self.rank, self.alpha, self.task_type)
        return get_peft_model(base_model, config, adapter_name=task_names[0])

    def begin_task(self, model, index, task_name, num_tasks):
        if task_name not in model.peft_config:
            model.add_adapter(task_name, _lora_config(self.target_modules, self.rank, self.alpha, self.task_type))
        names = list(model.peft_config)
        model.base_model.set_adapter(names)
        for param_name, param in model.named_parameters():
            if ".lora_" in param_name:
                param.requires_grad_(param_name.split(".")[-2] == task_name)
        return model

    def extra_loss(self, model):
        current = model.base_model.active_adapters[-1]
        terms = []
        for module in model.modules():
            if not isinstance(module, LoraLayer) or current not in module.lora_A:
                continue
            old = [module.lora_A[name].weight for name in module.lora_A if name != current]
            if old:
                terms.append(torch.abs(torch.cat(old) @ module.lora_A[current].weight.T).sum())
        return self.orth_lambda * torch.stack(terms).sum() if terms else None


@dataclass
class OSFMethod(Method):
    """PEFT's OSF: SVD split of each target weight, train the bottom ``rank`` directions; merge and re-split between
    tasks. With ``progressive``, the trainable rank of task t of T is ``rank * (T - t)`` (capped at half the layer),
    the growing preserved subspace of PEFT's OSF continual-learning example."""

    name: str = "osf"
    target_modules: Any = None
    rank: int = 40
    progressive: bool = False

    def build(self, base_model, task_names):
        return base_model

    def _config(self, model: nn.Module, trainable_rank: int):
        targets = _matching_linear_modules(model, self.target_modules)
        if not targets:
            raise ValueError(f"OSF found no nn.Linear module matching {self.target_modules!r}.")
        pattern = {}
        for name, module in targets.items():
            min_dim = min(module.weight.shape)
            pattern[f"(^|\\.){re.escape(name)}$"] = max(min_dim - min(trainable_rank, min_dim // 2 or 1), 1)
        first = next(iter(pattern.values()))
        return OSFConfig(target_modules=self.target_modules, effective_rank=first, rank_pattern=pattern)

    def begin_task(self, model, index, task_name, num_tasks):
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        trainable = self.rank * (num_tasks - index) if self.progressive else self.rank
        return get_peft_model(model, self._config(model, trainable))


def _matching_linear_modules(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """Linear modules whose name matches ``target_modules`` as PEFT matches them (suffix list or full regex)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(target_modules, str):
            matched = re.fullmatch(target_modules, name) is not None
        else:
            matched = any(name == key or name.endswith("." + key) for key in target_modules)
        if matched:
            found[name] = module
    return found


#: The paper design's settings (see `SpaRTAConfig.paper_design`) at the benchmark's ranks and scales: restoration every
#: 10 optimizer steps with the code's probability 1e-5.
PAPER_DESIGN = {
    "task_branches": "shared",
    "router": "components",
    "shared_update": "train",
    "restore_every": 10,
    "orth_lambda": 0.5,
}

#: name -> (class, keyword overrides). SpaRTA ablations change one thing against "sparta"; ranks follow r_shared and
#: r_task (the no-shared ablation gives its task branch the shared rank, so every method trains the same rank). The
#: spectral router routes by 4 singular directions per task, the setting it was measured with.
METHODS: dict[str, tuple[type, dict]] = {
    "sparta": (SpaRTAMethod, {}),
    "seq_lora": (LoRAMethod, {}),
    "o_lora": (OLoRAMethod, {}),
    "osf": (OSFMethod, {}),
    "osf_progressive": (OSFMethod, {"progressive": True}),
    "mtl_lora": (LoRAMethod, {"multitask": True}),
    "sparta_no_router": (SpaRTANoRouterMethod, {}),
    "sparta_no_shared": (SpaRTAMethod, {"config": {"r_shared": 0}}),
    "sparta_orth": (SpaRTAMethod, {"config": {"orth_lambda": 0.5}}),
    "sparta_spectral_init": (SpaRTAMethod, {"config": {"init_weights": "spectral"}}),
    "sparta_learned_router": (SpaRTAMethod, {"config": {"router": "learned"}}),
    "sparta_spectral_router": (SpaRTAMethod, {"config": {"router": "spectral", "router_prototypes": 4}}),
    "sparta_token_routing": (SpaRTAMethod, {"config": {"router_granularity": "token"}}),
    "sparta_train_shared": (SpaRTAMethod, {"config": {"shared_update": "train"}}),
    "sparta_one_prototype": (SpaRTAMethod, {"config": {"router_prototypes": 1}}),
    "sparta_paper": (SpaRTAMethod, {"config": PAPER_DESIGN, "routes": False}),
    "sparta_paper_no_restore": (SpaRTAMethod, {"config": {**PAPER_DESIGN, "restore_every": None}, "routes": False}),
    "sparta_paper_no_subspace": (SpaRTAMethod, {"config": {**PAPER_DESIGN, "orth_lambda": 0.0}, "routes": False}),
}


def make_method(
    name: str,
    target_modules,
    r_shared: int = 8,
    r_task: int = 32,
    task_type: str | None = None,
    sparta_overrides: dict | None = None,
) -> Method:
    """The method ``name`` of `METHODS` at total rank r_shared + r_task per task. LoRA baselines use alpha = 2 r
    (scale 2, as SpaRTA's default alpha / r); ``sparta_overrides`` are extra `SpaRTAConfig` fields for SpaRTA runs."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}.")
    cls, overrides = METHODS[name]
    overrides = dict(overrides)
    rank = r_shared + r_task
    if issubclass(cls, SpaRTAMethod):
        config = {"r_shared": r_shared, "r_task": r_task, "task_type": task_type, **(sparta_overrides or {})}
        config.update(overrides.pop("config", {}))
        if config["r_shared"] == 0:
            config["r_task"] = rank
            config["alpha_task"] = 2.0 * rank
        return cls(name=name, target_modules=target_modules, config=config, **overrides)
    if cls is OSFMethod:
        return OSFMethod(name=name, target_modules=target_modules, rank=rank, **overrides)
    return cls(name=name, target_modules=target_modules, rank=rank, alpha=2.0 * rank, task_type=task_type, **overrides)
