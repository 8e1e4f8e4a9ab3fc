"""SpaRTA tuner layers: a shared low-rank branch, one high-rank branch per task and a router, around a base layer."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SpaRTAConfig
from .initialization import init_branch, scaling
from .kernels import StackedBlocks, gated_lowrank, gated_lowrank_stacked, stack_blocks
from .quantization import check_mergeable, warn_requantization
from .regularizers import LayerRegularizers
from .routers import Branches, RoutedLayer, Router, Routing, RoutingContext, TaskBranches, make_router
from .utils import tensor_states
from .variants import TaskBranchVariant, task_branch_variant


#: How many sets of routed task branches each layer keeps stacked per adapter for inference (`inference_blocks`): a
#: batch routed to another set stacks it once more and drops the oldest.
STACKED_SETS = 8


class SpaRTALayer(BaseTunerLayer, LayerRegularizers, RoutedLayer):
    """State of SpaRTA adapters on one base layer, keyed by adapter name.

    Per adapter: a shared branch (A_sh, B_sh), trainable with the first task (and on every task with
    ``shared_update="train"``); a list of task branches (A_k, B_k) of which only the last, the current task, is
    trainable; and a `Router` that weighs the task branches per input. With a single task and no abstain threshold
    the router is the constant 1, so the adapter is a LoRA of rank r_shared + r_task.

    Which task branches exist and which one a task uses is the adapter's `TaskBranchVariant`, chosen from
    ``task_branches``: with ``"shared"`` (the paper design) there is one task branch whatever the number of tasks,
    trained on every task like the shared branch, and the component router weighs both branches per input; adding a
    task grows the router only (see `peft_sparta.variants`).
    """

    adapter_layer_names = ("sparta_A_shared", "sparta_B_shared", "sparta_A_task", "sparta_B_task", "sparta_router")
    other_param_names = (
        "r_shared",
        "r_task",
        "scaling_shared",
        "scaling_task",
        "sparta_settings",
        "sparta_variant",
        "forced_task",
        "merged_task",
        "sparta_frozen_summary",
        "sparta_inference_blocks",
    )

    def __init__(
        self, base_layer: nn.Module, fan_in_fan_out: bool = False, quantization_backend=None, **kwargs
    ) -> None:
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.quantization_backend = quantization_backend  # PEFT's, for a quantized base (see `quantization`)
        self.r_shared: dict[str, int] = {}
        self.r_task: dict[str, int] = {}
        self.scaling_shared: dict[str, float] = {}
        self.scaling_task: dict[str, float] = {}
        self.sparta_A_shared = nn.ParameterDict({})
        self.sparta_B_shared = nn.ParameterDict({})
        self.sparta_A_task = nn.ModuleDict({})
        self.sparta_B_task = nn.ModuleDict({})
        self.sparta_router = nn.ModuleDict({})
        self.sparta_settings: dict[str, SpaRTAConfig] = {}
        self.sparta_variant: dict[str, TaskBranchVariant] = {}
        self.forced_task: dict[str, Optional[int]] = {}
        self.merged_task: dict[str, int] = {}
        self.sparta_frozen_summary: dict[str, tuple] = {}  # see LayerRegularizers._frozen_summary
        self.sparta_inference_blocks: dict[str, dict] = {}  # see inference_blocks
        self.routing_context: Optional[RoutingContext] = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            raise ValueError(
                f"SpaRTA cannot adapt a layer of type {type(base_layer).__name__}; supported base layers are "
                "torch.nn.Linear and transformers Conv1D. Remove it from target_modules."
            )

    def update_layer(
        self,
        adapter_name: str,
        config: SpaRTAConfig,
        granularity: str,
        query_dim: Optional[int] = None,
        router_owner: Optional[Router] = None,
    ) -> None:
        """Create the adapter ``adapter_name`` with one branch per task of ``config.task_names``.

        ``query_dim``: size of the model's input embeddings, the queries of sequence routing. ``router_owner``: the
        router of another layer of this adapter that holds the sequence-routing state, which this layer shares.
        """
        if granularity == "sequence" and query_dim is None:
            raise ValueError("Sequence routing needs the dimension of the model's input embeddings.")
        self.sparta_settings[adapter_name] = config
        self.sparta_variant[adapter_name] = task_branch_variant(config)
        self.r_shared[adapter_name] = config.r_shared
        self.r_task[adapter_name] = config.r_task
        self.scaling_shared[adapter_name] = scaling(config.alpha_shared, config.r_shared, config.use_rslora)
        self.scaling_task[adapter_name] = scaling(config.alpha_task, config.r_task, config.use_rslora)
        self.forced_task[adapter_name] = None
        self.sparta_router[adapter_name] = make_router(
            config, granularity, query_dim if granularity == "sequence" else self.in_features, router_owner
        )
        if config.r_shared > 0:
            a, b = self._new_branch(config.r_shared, torch.float32)
            self._init_branch(adapter_name, a, b, start=0)
            self.sparta_A_shared[adapter_name], self.sparta_B_shared[adapter_name] = a, b
        self.sparta_A_task[adapter_name] = nn.ParameterList()
        self.sparta_B_task[adapter_name] = nn.ParameterList()
        for _ in config.task_names:
            self.add_task(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def add_task(self, adapter_name: str) -> None:
        """Freeze the current task branch (and its router state) and start a new task: a new task branch (with
        ``task_branches="shared"``, the single task branch only with the first task) and its router state, trainable
        if the adapter is active (an inactive adapter stays wholly frozen)."""
        self.sparta_variant[adapter_name].add_task(self, adapter_name)
        self.sparta_router[adapter_name].add_task()
        if adapter_name not in self.active_adapters:
            for param in self.adapter_parameters(adapter_name):
                param.requires_grad_(False)
        self._freeze_finished(adapter_name)
        self.sparta_inference_blocks.pop(adapter_name, None)

    def remove_task(self, adapter_name: str, index: int) -> None:
        """Drop task ``index``'s branch and router state, as if it had never been added: the last remaining task is
        the current one, and if the adapter was being trained, what would be trainable had the task never been
        added is trainable again (the current branch and router state, the shared branch when one task is left).
        With ``task_branches="shared"`` only the task's router rows go: the branches keep what every task taught
        them."""
        trainable = self.sparta_A_task[adapter_name][-1].requires_grad
        self.sparta_variant[adapter_name].remove_task(self, adapter_name, index)
        self.sparta_router[adapter_name].remove_task(index)
        forced = self.forced_task[adapter_name]
        if forced is not None:
            self.forced_task[adapter_name] = None if forced == index else forced - int(forced > index)
        if trainable:
            for param in self.adapter_parameters(adapter_name):
                param.requires_grad_(True)
        self._freeze_finished(adapter_name)
        self.sparta_inference_blocks.pop(adapter_name, None)

    def _append_task_branch(self, adapter_name: str) -> None:
        """Append a new task branch in the dtype of the existing ones (initialised on the next ranks with
        ``init_weights="spectral"``)."""
        config = self.sparta_settings[adapter_name]
        a_tasks, b_tasks = self.sparta_A_task[adapter_name], self.sparta_B_task[adapter_name]
        a, b = self._new_branch(config.r_task, a_tasks[0].dtype if len(a_tasks) else torch.float32)
        self._init_branch(adapter_name, a, b, start=config.r_shared + len(a_tasks) * config.r_task)
        a_tasks.append(a)
        b_tasks.append(b)

    def _drop_task_branch(self, adapter_name: str, index: int) -> None:
        for container in (self.sparta_A_task, self.sparta_B_task):
            kept = [param for task, param in enumerate(container[adapter_name]) if task != index]
            container[adapter_name] = nn.ParameterList(kept)

    def _new_branch(self, rank: int, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
        factory = {"device": self.get_base_layer().weight.device, "dtype": dtype}
        a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        return a, nn.Parameter(torch.empty(self.out_features, rank, **factory))

    def _init_branch(self, adapter_name: str, a: nn.Parameter, b: nn.Parameter, start: int) -> None:
        tasks = self.sparta_A_task[adapter_name] if adapter_name in self.sparta_A_task else []
        taken = [*self._shared_down(adapter_name), *tasks]
        init = self.sparta_settings[adapter_name].init_weights
        weight = self.get_base_weight() if init == "spectral" else None  # dequantized, on a quantized base
        init_branch(a, b, init, weight.T if self.fan_in_fan_out and weight is not None else weight, start, taken)

    def _shared_down(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.sparta_A_shared[adapter_name]] if adapter_name in self.sparta_A_shared else []

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter of the adapter on this layer: branches and router."""
        tasks = [*self.sparta_A_task[adapter_name], *self.sparta_B_task[adapter_name]]
        return [*self._shared_branch(adapter_name), *tasks, *self.sparta_router[adapter_name].parameters()]

    def _shared_branch(self, adapter_name: str) -> list[nn.Parameter]:
        if adapter_name not in self.sparta_A_shared:
            return []
        return [self.sparta_A_shared[adapter_name], self.sparta_B_shared[adapter_name]]

    # ---- trainability ----------------------------------------------------------------------------------------------

    def num_tasks(self, adapter_name: str) -> int:
        """The number of task branches (1 with ``task_branches="shared"``, whatever the number of tasks)."""
        return len(self.sparta_A_task[adapter_name])

    def shared_is_trainable(self, adapter_name: str) -> bool:
        config = self.sparta_settings[adapter_name]
        return config.shared_update == "train" or self.num_tasks(adapter_name) <= 1

    def _freeze_finished(self, adapter_name: str) -> None:
        """Old task branches, their router state, and the shared branch when configured so, never train again."""
        frozen = [*list(self.sparta_A_task[adapter_name])[:-1], *list(self.sparta_B_task[adapter_name])[:-1]]
        frozen += self.sparta_router[adapter_name].frozen_parameters()
        if not self.shared_is_trainable(adapter_name):
            frozen += self._shared_branch(adapter_name)
        for param in frozen:
            param.requires_grad_(False)

    def _freeze_all_finished(self) -> None:
        for adapter_name in self.sparta_A_task:
            self._freeze_finished(adapter_name)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_all_finished()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_all_finished()

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        self._freeze_all_finished()

    # ---- routing -----------------------------------------------------------------------------------------------------

    def branches(self, adapter_name: str) -> Branches:
        """The task branches (A_k, B_k) of the adapter, in task order."""
        return TaskBranches(self.sparta_A_task[adapter_name], self.sparta_B_task[adapter_name])

    def router(self, adapter_name: str) -> Router:
        return self.sparta_router[adapter_name]

    def route(self, adapter_name: str, x: torch.Tensor) -> Routing:
        """Which task branches to compute for ``x``, their gates (None: each selected branch has gate 1) and the
        router's loss: the forced task (``set_task``) alone, else what the router decides (see `Router.route`)."""
        forced = self.forced_task[adapter_name]
        if forced is not None:
            return Routing([self.sparta_variant[adapter_name].branch_of(forced)])
        return self.router(adapter_name).route(x, self.routing_context, self.branches(adapter_name), self.training)

    def router_gates(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Gates over all task branches (..., tasks) that the router gives input ``x`` at inference, with no side
        effect (also in training mode, where the layer itself routes to the current task): one-hot for a forced task
        or a single task, all zero for an input the router abstains on. With ``task_branches="shared"``: the weights
        (..., 2) of the shared and the task branch (both 1 under `set_task`)."""
        forced = self.forced_task[adapter_name]
        if forced is not None:
            return self.sparta_variant[adapter_name].forced_gates(self, adapter_name, forced, x)
        return self.router(adapter_name).decide(x, self.routing_context, self.branches(adapter_name))

    def router_scores(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Each task's score (..., tasks) for input ``x``: its best cosine similarity to the task's prototypes, key or
        singular directions, the quantity ``router_abstain_threshold`` is compared with."""
        router = self.router(adapter_name)
        return router.scores(router.queries(x, self.routing_context), self.branches(adapter_name))

    # ---- computation -------------------------------------------------------------------------------------------------

    def adapter_delta(
        self, adapter_name: str, x: torch.Tensor, tasks: list[int], gates, shared_gate=None
    ) -> torch.Tensor:
        """The adapter's contribution for input x: shared branch (gate ``shared_gate``, 1 when None) plus the task
        branches ``tasks`` with ``gates``."""
        shared = adapter_name in self.sparta_A_shared
        if not tasks and not shared:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a_blocks = [self.sparta_A_task[adapter_name][t] for t in tasks]
        b_blocks = [self.sparta_B_task[adapter_name][t] for t in tasks]
        scales = [self.scaling_task[adapter_name]] * len(tasks)
        if shared:
            a_blocks.insert(0, self.sparta_A_shared[adapter_name])
            b_blocks.insert(0, self.sparta_B_shared[adapter_name])
            scales.insert(0, self.scaling_shared[adapter_name])
            if gates is not None:
                shared_gate = gates.new_ones(*gates.shape[:-1], 1) if shared_gate is None else shared_gate
                gates = torch.cat([shared_gate, gates], dim=-1)
        x = self._cast_input_dtype(x, a_blocks[0].dtype)
        if gates is not None:
            gates = gates.to(x.dtype)
        config = self.sparta_settings[adapter_name]
        return gated_lowrank(
            x,
            a_blocks,
            b_blocks,
            scales,
            gates,
            config.dropout,
            self.training,
            backend=config.kernel_backend,
            recompute=config.recompute_activations,
        )

    def inference_delta(self, adapter_name: str, x: torch.Tensor, routing: Routing) -> Optional[torch.Tensor]:
        """The adapter's contribution for ``x`` as `adapter_delta` computes it, from the shared and the routed task
        branches stacked once per weight version (`inference_blocks`), with no autograd Function, whatever the
        kernel backend; None when the call needs the general path: in training mode, and when a gradient is wanted
        (grad mode on and the input, a routed branch or the gates requiring grad)."""
        if self.training:
            return None
        gates, shared_gate = routing.gates, routing.shared_gate
        if torch.is_grad_enabled() and (
            x.requires_grad or any(g is not None and g.requires_grad for g in (gates, shared_gate))
        ):
            return None
        shared = self.r_shared[adapter_name] > 0
        if not routing.tasks and not shared:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        gated_shared = shared and shared_gate is not None
        stacked = self.inference_blocks(adapter_name, tuple(routing.tasks), gated_shared)
        if stacked is None:
            return None
        if gated_shared:
            ones = shared_gate.new_ones(*shared_gate.shape[:-1], len(routing.tasks))
            gates = torch.cat([shared_gate, ones if gates is None else gates], dim=-1)
        elif not routing.tasks:
            gates = None
        return gated_lowrank_stacked(self._cast_input_dtype(x, stacked.down.dtype), stacked, gates)

    def inference_blocks(self, adapter_name: str, tasks: tuple[int, ...], gated_shared: bool = False):
        """The shared branch and the task branches ``tasks`` stacked for `gated_lowrank_stacked` (scales folded in),
        or None when a gradient is wanted from one of them (grad mode on and the branch trainable).

        Built once per weight version and kept per set of tasks (at most `STACKED_SETS` sets per adapter, the oldest
        dropped first), so that inference does not concatenate the blocks again at every call. An entry is used
        only while its blocks keep their storage and version counter (`tensor_states`), which every in-place change
        bumps (optimizer steps, editing a weight under ``torch.no_grad()``); `add_task`, `remove_task`, loading a
        state dict, switching to training mode and moving or casting the layer drop every entry. Writes through
        ``.data`` bypass the version counter and assigning a new tensor to a branch is not seen: call
        ``model.train()`` after them.
        """
        cache = self.sparta_inference_blocks.setdefault(adapter_name, {})
        key = (tasks, gated_shared)
        cached = cache.get(key)
        if cached is None or not _unchanged(cached[0]):
            cache.pop(key, None)
            while len(cache) >= STACKED_SETS:
                cache.pop(next(iter(cache)))
            a_tasks, b_tasks = self.sparta_A_task[adapter_name], self.sparta_B_task[adapter_name]
            blocks = [*self._shared_branch(adapter_name)]
            for task in tasks:
                blocks += (a_tasks[task], b_tasks[task])
            cached = cache[key] = (tensor_states(blocks), self._stack(adapter_name, blocks, gated_shared))
        if torch.is_grad_enabled() and any(block.requires_grad for block, *_ in cached[0]):
            return None
        return cached[1]

    def _stack(self, adapter_name: str, blocks: list[torch.Tensor], gated_shared: bool) -> StackedBlocks:
        """`stack_blocks` of [A_shared, B_shared, A_k, B_k, ...] (the shared branch first when there is one), the
        shared branch ungated unless ``gated_shared``."""
        shared = adapter_name in self.sparta_A_shared
        scales = [self.scaling_task[adapter_name]] * (len(blocks) // 2 - int(shared))
        if shared:
            scales.insert(0, self.scaling_shared[adapter_name])
        return stack_blocks(blocks[0::2], blocks[1::2], scales, ungated=int(shared and not gated_shared))

    def _merge_task(self, adapter_name: str) -> int:
        """The task whose branch a merge folds into the weight: the forced one, or the one the variant allows (the
        only one of a per-task adapter), else a ValueError saying how to merge."""
        forced = self.forced_task[adapter_name]
        if forced is not None:
            return forced
        return self.sparta_variant[adapter_name].unforced_merge_task(self, adapter_name)


class Linear(nn.Module, SpaRTALayer):
    """SpaRTA around an `nn.Linear` or a transformers `Conv1D` (``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SpaRTAConfig,
        granularity: str,
        query_dim: Optional[int] = None,
        router_owner: Optional[Router] = None,
        fan_in_fan_out: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SpaRTALayer.__init__(self, base_layer, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self.register_load_state_dict_post_hook(_drop_inference_blocks)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, granularity, query_dim, router_owner)

    def get_delta_weight(self, adapter_name: str, task: Optional[int] = None) -> torch.Tensor:
        """Weight update of the adapter with task branch ``task`` routed alone, in the base weight's layout."""
        task = self._merge_task(adapter_name) if task is None else task
        branch = self.sparta_variant[adapter_name].branch_of(task)
        weight = self.get_base_layer().weight
        a = self.sparta_A_task[adapter_name][branch]
        compute_dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        delta = self.scaling_task[adapter_name] * (
            self.sparta_B_task[adapter_name][branch].to(compute_dtype) @ a.to(compute_dtype)
        )
        if adapter_name in self.sparta_A_shared:
            shared_b = self.sparta_B_shared[adapter_name].to(compute_dtype)
            delta = delta + self.scaling_shared[adapter_name] * (
                shared_b @ self.sparta_A_shared[adapter_name].to(compute_dtype)
            )
        delta = delta.T if self.fan_in_fan_out else delta
        return delta if self.quantization_backend is not None else delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter_name in adapter_names:
            if adapter_name not in self.sparta_A_task:
                continue
            task = self._merge_task(adapter_name)
            check_mergeable(self.quantization_backend, adapter_name)
            delta = self.get_delta_weight(adapter_name, task)
            weight = self.get_base_weight()  # the weight's own data; a dequantized copy on a quantized base
            weight = weight + delta if safe_merge else weight.add_(delta)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems broken.")
            self.set_base_weight(weight)
            self.merged_task[adapter_name] = task
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.sparta_A_task:
                warn_requantization(self.quantization_backend, adapter_name, "Unmerging")
                delta = self.get_delta_weight(adapter_name, self.merged_task.pop(adapter_name))
                self.set_base_weight(self.get_base_weight().sub_(delta))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if adapter_name not in self.sparta_settings:
                continue
            routing = self.route(adapter_name, x)
            delta = self.inference_delta(adapter_name, x, routing)
            if delta is None:
                delta = self.adapter_delta(adapter_name, x, routing.tasks, routing.gates, routing.shared_gate)
            result = result + delta.to(result.dtype)
            if self.training:
                result = self._attach_regularizers(adapter_name, result, routing.loss)
        return result

    def _apply(self, fn, *args, **kwargs):
        """Moves and casts (``.to()``, ``.half()``, ...) also drop the summaries of frozen branches and the stacked
        inference blocks, rebuilt at their next use from the converted blocks: the new storage may reuse the old
        one's address."""
        self.sparta_frozen_summary.clear()
        self.sparta_inference_blocks.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        """Switching to training mode drops the stacked inference blocks: training changes the branches, and their
        copies would only hold memory until the next inference stacks them again."""
        if mode:
            self.sparta_inference_blocks.clear()
        return super().train(mode)

    def __repr__(self) -> str:
        return "sparta." + super().__repr__()


def _unchanged(states: list[tuple]) -> bool:
    """Whether every tensor of `tensor_states` ``states`` keeps its storage and version."""
    return all(tensor.data_ptr() == pointer and tensor._version == version for tensor, pointer, version in states)


def _drop_inference_blocks(layer: SpaRTALayer, incompatible_keys) -> None:
    """Load-state-dict post-hook: loading copies into the branches or assigns new ones, so the stacks are stale."""
    layer.sparta_inference_blocks.clear()


def sparta_layers(module: nn.Module) -> list[SpaRTALayer]:
    """Every SpaRTA layer inside ``module``, in module order."""
    return list(iter_sparta_layers(module))


def iter_sparta_layers(module: nn.Module) -> Iterator[SpaRTALayer]:
    """The SpaRTA layers inside ``module``, in module order, found one at a time: a search that stops at the first
    layer it needs does not walk the whole model."""
    return (child for child in module.modules() if isinstance(child, SpaRTALayer))
