"""SpaRTA tuner layers: a shared low-rank branch, one high-rank branch per task and a router, around a base layer."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from . import router as routing
from .config import SpaRTAConfig
from .kernels import gated_lowrank, orthogonality_penalty


class SpaRTALayer(BaseTunerLayer):
    """State and routing of SpaRTA adapters on one base layer, keyed by adapter name.

    Per adapter: a shared branch (A_sh, B_sh) trained on every task, a list of task branches (A_k, B_k) of which only
    the last (the current task) is trainable, and the router state (prototypes, or learned keys). With a single task
    the router is the constant 1, so the adapter is a LoRA of rank r_shared + r_task.
    """

    adapter_layer_names = ("sparta_A_shared", "sparta_B_shared", "sparta_A_task", "sparta_B_task", "sparta_router_keys")
    other_param_names = (
        "r_shared",
        "r_task",
        "scaling_shared",
        "scaling_task",
        "sparta_prototypes",
        "sparta_prototype_counts",
        "sparta_router_projection",
        "sparta_settings",
        "granularity",
        "router_dim",
        "forced_task",
        "merged_task",
    )

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, **kwargs) -> None:
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.r_shared: dict[str, int] = {}
        self.r_task: dict[str, int] = {}
        self.scaling_shared: dict[str, float] = {}
        self.scaling_task: dict[str, float] = {}
        self.sparta_A_shared = nn.ParameterDict({})
        self.sparta_B_shared = nn.ParameterDict({})
        self.sparta_A_task = nn.ModuleDict({})
        self.sparta_B_task = nn.ModuleDict({})
        self.sparta_router_keys = nn.ModuleDict({})
        self.sparta_prototypes = BufferDict({}, persistent=True)
        self.sparta_prototype_counts = BufferDict({}, persistent=True)
        self.sparta_router_projection = BufferDict({}, persistent=False)
        self.sparta_settings: dict[str, SpaRTAConfig] = {}
        self.granularity: dict[str, str] = {}
        self.router_dim: dict[str, int] = {}
        self.forced_task: dict[str, Optional[int]] = {}
        self.merged_task: dict[str, int] = {}
        self.routing_context: Optional[routing.RoutingContext] = None
        self.last_router_loss: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape
        else:
            raise ValueError(
                f"SpaRTA cannot adapt a layer of type {type(base_layer).__name__}; supported base layers are "
                "torch.nn.Linear and transformers Conv1D. Remove it from target_modules."
            )
        self.in_features = in_features
        self.out_features = out_features

    # ---- building ------------------------------------------------------------------------------------------------

    def update_layer(
        self, adapter_name: str, config: SpaRTAConfig, granularity: str, query_dim: Optional[int] = None
    ) -> None:
        """Create the adapter ``adapter_name`` with one branch per task of ``config.task_names``."""
        self.sparta_settings[adapter_name] = config
        self.granularity[adapter_name] = granularity
        self.r_shared[adapter_name] = config.r_shared
        self.r_task[adapter_name] = config.r_task
        self.scaling_shared[adapter_name] = _scaling(config.alpha_shared, config.r_shared, config.use_rslora)
        self.scaling_task[adapter_name] = _scaling(config.alpha_task, config.r_task, config.use_rslora)
        self.forced_task[adapter_name] = None
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": torch.float32}
        if config.r_shared > 0:
            self.sparta_A_shared[adapter_name] = nn.Parameter(torch.empty(config.r_shared, self.in_features, **factory))
            self.sparta_B_shared[adapter_name] = nn.Parameter(
                torch.empty(self.out_features, config.r_shared, **factory)
            )
        self.sparta_A_task[adapter_name] = nn.ParameterList()
        self.sparta_B_task[adapter_name] = nn.ParameterList()
        if config.router == "learned":
            self.sparta_router_keys[adapter_name] = nn.ParameterList()
        router_dim = self.router_dim[adapter_name] = self._query_dim(config, granularity, query_dim)
        if config.router_dim is not None and config.router != "spectral":
            source_dim = query_dim if granularity == "sequence" else self.in_features
            self.sparta_router_projection[adapter_name] = _random_projection(source_dim, config.router_dim, weight)
        if config.router == "prototype":
            self.sparta_prototypes[adapter_name] = torch.zeros(0, config.router_prototypes, router_dim, **factory)
            self.sparta_prototype_counts[adapter_name] = torch.zeros(
                0, config.router_prototypes, dtype=torch.long, device=weight.device
            )
        self._init_shared(adapter_name)
        for _ in config.task_names:
            self.add_task(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _query_dim(self, config: SpaRTAConfig, granularity: str, query_dim: Optional[int]) -> int:
        if config.router_dim is not None and config.router != "spectral":
            return config.router_dim
        if granularity == "sequence":
            if query_dim is None:
                raise ValueError("Sequence routing needs the dimension of the model's input embeddings.")
            return query_dim
        return self.in_features

    def _init_shared(self, adapter_name: str) -> None:
        if adapter_name not in self.sparta_A_shared:
            return
        a, b = self.sparta_A_shared[adapter_name], self.sparta_B_shared[adapter_name]
        self._init_branch(adapter_name, a, b, spectral_start=0)

    def add_task(self, adapter_name: str) -> None:
        """Freeze the current task branch (and its router state) and append a new trainable task branch."""
        config = self.sparta_settings[adapter_name]
        a_tasks, b_tasks = self.sparta_A_task[adapter_name], self.sparta_B_task[adapter_name]
        reference = self.get_base_layer().weight
        dtype = a_tasks[0].dtype if len(a_tasks) else torch.float32
        factory = {"device": reference.device, "dtype": dtype}
        a = nn.Parameter(torch.empty(config.r_task, self.in_features, **factory))
        b = nn.Parameter(torch.empty(self.out_features, config.r_task, **factory))
        self._init_branch(adapter_name, a, b, spectral_start=config.r_shared + len(a_tasks) * config.r_task)
        a_tasks.append(a)
        b_tasks.append(b)
        if adapter_name in self.sparta_router_keys:
            keys = self.sparta_router_keys[adapter_name]
            keys.append(nn.Parameter(F.normalize(torch.randn(self.router_dim[adapter_name], **factory), dim=0)))
        if adapter_name in self.sparta_prototypes:
            prototypes = self.sparta_prototypes[adapter_name]
            counts = self.sparta_prototype_counts[adapter_name]
            self.sparta_prototypes[adapter_name] = torch.cat([prototypes, prototypes.new_zeros(1, *prototypes.shape[1:])])
            self.sparta_prototype_counts[adapter_name] = torch.cat([counts, counts.new_zeros(1, counts.shape[1])])
        self._freeze_old_tasks(adapter_name)

    def _init_branch(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor, spectral_start: int) -> None:
        init = self.sparta_settings[adapter_name].init_weights
        if a.device.type == "meta":
            return
        with torch.no_grad():
            if init == "spectral":
                a.copy_(self._spectral_rows(adapter_name, spectral_start, a.shape[0]))
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    def _spectral_rows(self, adapter_name: str, start: int, count: int) -> torch.Tensor:
        """Right singular vectors start..start+count of the base weight; past the spectrum, a random orthonormal
        complement of every existing branch of this adapter."""
        weight = self._base_weight_out_in().float()
        _, _, vh = torch.linalg.svd(weight, full_matrices=False)
        rows = vh[start : start + count]
        missing = count - rows.shape[0]
        if missing > 0:
            taken = [rows, *self._down_projections(adapter_name)]
            rows = torch.cat([rows, _orthonormal_complement(torch.cat(taken).float(), missing)])
        return rows

    def _base_weight_out_in(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def _down_projections(self, adapter_name: str) -> list[torch.Tensor]:
        shared = [self.sparta_A_shared[adapter_name]] if adapter_name in self.sparta_A_shared else []
        return [t.detach() for t in [*shared, *self.sparta_A_task[adapter_name]]]

    # ---- trainability ----------------------------------------------------------------------------------------------

    def num_tasks(self, adapter_name: str) -> int:
        return len(self.sparta_A_task[adapter_name])

    def shared_is_trainable(self, adapter_name: str) -> bool:
        config = self.sparta_settings[adapter_name]
        return config.shared_update == "train" or self.num_tasks(adapter_name) <= 1

    def _freeze_old_tasks(self, adapter_name: str) -> None:
        """Old task branches, their keys, and the shared branch when configured so, never train again."""
        frozen = list(self.sparta_A_task[adapter_name])[:-1] + list(self.sparta_B_task[adapter_name])[:-1]
        if adapter_name in self.sparta_router_keys:
            frozen += list(self.sparta_router_keys[adapter_name])[:-1]
        if adapter_name in self.sparta_A_shared and not self.shared_is_trainable(adapter_name):
            frozen += [self.sparta_A_shared[adapter_name], self.sparta_B_shared[adapter_name]]
        for param in frozen:
            param.requires_grad_(False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        for adapter_name in self.sparta_A_task:
            self._freeze_old_tasks(adapter_name)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for adapter_name in self.sparta_A_task:
            self._freeze_old_tasks(adapter_name)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        for adapter_name in self.sparta_A_task:
            self._freeze_old_tasks(adapter_name)

    # ---- routing -----------------------------------------------------------------------------------------------------

    def _queries(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm routing queries: (batch, 1, d) for sequence routing, (..., d) per token otherwise."""
        if self.granularity[adapter_name] == "sequence":
            context = self.routing_context
            if context is None or context.sequence_query is None:
                raise RuntimeError(
                    "Sequence routing needs the model's input (input_ids or inputs_embeds) to compute its query; call "
                    "the whole model, or set router_granularity='token'."
                )
            query = context.sequence_query
            if x.dim() < 2 or x.shape[0] != query.shape[0]:
                raise RuntimeError(
                    f"Sequence routing expects layer inputs of shape (batch, ..., features) with batch "
                    f"{query.shape[0]}, got {tuple(x.shape)}; use router_granularity='token' for this model."
                )
            query = query.view(query.shape[0], *([1] * (x.dim() - 2)), query.shape[-1])
        else:
            query = x.detach()
        if adapter_name in self.sparta_router_projection:
            projection = self.sparta_router_projection[adapter_name]
            query = query.to(projection.dtype) @ projection
        return F.normalize(query.float(), dim=-1)

    def _state_queries(self, adapter_name: str, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The queries (N, d) that build the current task's router state: prompt positions only when known."""
        if self.granularity[adapter_name] == "sequence":
            return queries.reshape(-1, queries.shape[-1])
        mask = self.routing_context.token_mask if self.routing_context is not None else None
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            return queries[mask.to(queries.device)]
        return queries.reshape(-1, queries.shape[-1])

    def _scores(self, adapter_name: str, queries: torch.Tensor) -> torch.Tensor:
        config = self.sparta_settings[adapter_name]
        if config.router == "prototype":
            return routing.prototype_scores(
                queries, self.sparta_prototypes[adapter_name], self.sparta_prototype_counts[adapter_name]
            )
        if config.router == "learned":
            return routing.key_scores(queries, torch.stack(list(self.sparta_router_keys[adapter_name])))
        directions = torch.stack(
            [
                routing.spectral_directions(a, b, config.router_prototypes)
                for a, b in zip(self.sparta_A_task[adapter_name], self.sparta_B_task[adapter_name])
            ]
        )
        return routing.spectral_scores(queries, directions)

    def _learn_route(self, adapter_name: str, x: torch.Tensor) -> None:
        """In training: build the current task's router state from this batch (prototypes or key loss)."""
        config = self.sparta_settings[adapter_name]
        if config.router == "spectral":
            return
        queries = self._state_queries(adapter_name, x, self._queries(adapter_name, x))
        current = self.num_tasks(adapter_name) - 1
        if config.router == "prototype":
            routing.update_prototypes(
                self.sparta_prototypes[adapter_name][current],
                self.sparta_prototype_counts[adapter_name][current],
                queries,
            )
        elif queries.shape[0] > 0:
            keys = torch.stack(list(self.sparta_router_keys[adapter_name]))
            self.last_router_loss[adapter_name] = routing.router_loss(
                queries, keys, current, config.router_temperature
            )

    def route(self, adapter_name: str, x: torch.Tensor) -> tuple[list[int], Optional[torch.Tensor]]:
        """Which task branches to compute for ``x`` and their gates (None: each selected branch has gate 1).

        A forced task (``set_task``) or a single task selects one branch; in training the current task is routed to
        its own branch while its router state is built; otherwise the router decides per input.
        """
        forced = self.forced_task[adapter_name]
        if forced is not None:
            return [forced], None
        tasks = self.num_tasks(adapter_name)
        if self.training:
            self._learn_route(adapter_name, x)
            return [tasks - 1], None
        if tasks == 1 and self.sparta_settings[adapter_name].router_abstain_threshold is None:
            return [0], None
        gates = self.router_gates(adapter_name, x)
        used = gates.reshape(-1, tasks).amax(dim=0).nonzero().flatten().tolist()
        return used, gates[..., used]

    def router_gates(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Gates over all task branches (..., tasks) that the router gives input ``x`` at inference, with no side
        effect (also in training mode, where the layer itself routes to the current task): one-hot for a forced task
        or a single task, all zero for an input the router abstains on."""
        tasks = self.num_tasks(adapter_name)
        config = self.sparta_settings[adapter_name]
        forced = self.forced_task[adapter_name]
        if forced is not None or (tasks == 1 and config.router_abstain_threshold is None):
            index = torch.tensor(0 if forced is None else forced, device=x.device)
            return F.one_hot(index, tasks).float().expand(*x.shape[:-1], tasks)
        scores = self.router_scores(adapter_name, x)
        threshold = config.router_abstain_threshold
        return routing.gates_from_scores(scores, config.router_temperature, config.top_k, threshold)

    def router_scores(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Each task's score (..., tasks) for input ``x``: its best cosine similarity to the task's prototypes, key or
        singular directions, the quantity ``router_abstain_threshold`` is compared with."""
        return self._scores(adapter_name, self._queries(adapter_name, x))

    # ---- computation -------------------------------------------------------------------------------------------------

    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input x: shared branch plus routed task branches."""
        tasks, gates = self.route(adapter_name, x)
        if not tasks and adapter_name not in self.sparta_A_shared:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a_blocks = [self.sparta_A_task[adapter_name][t] for t in tasks]
        b_blocks = [self.sparta_B_task[adapter_name][t] for t in tasks]
        scales = [self.scaling_task[adapter_name]] * len(tasks)
        if adapter_name in self.sparta_A_shared:
            a_blocks.insert(0, self.sparta_A_shared[adapter_name])
            b_blocks.insert(0, self.sparta_B_shared[adapter_name])
            scales.insert(0, self.scaling_shared[adapter_name])
            if gates is not None:
                gates = torch.cat([gates.new_ones(*gates.shape[:-1], 1), gates], dim=-1)
        x = self._cast_input_dtype(x, a_blocks[0].dtype)
        if gates is not None:
            gates = gates.to(x.dtype)
        config = self.sparta_settings[adapter_name]
        return gated_lowrank(
            x, a_blocks, b_blocks, scales, gates, config.dropout, self.training, backend=config.kernel_backend
        )

    def orthogonality_loss(self, adapter_name: str) -> torch.Tensor | None:
        """Overlap of the trainable down-projections with every other branch of this adapter (SPEC.md formula)."""
        config = self.sparta_settings[adapter_name]
        tasks = list(self.sparta_A_task[adapter_name])
        shared = self.sparta_A_shared[adapter_name] if adapter_name in self.sparta_A_shared else None
        current, old = tasks[-1], tasks[:-1]
        others = ([shared] if shared is not None else []) + old
        if not others:
            return None
        loss = orthogonality_penalty(current, others, config.orth_norm, backend=config.kernel_backend)
        if shared is not None and old and shared.requires_grad:
            loss = loss + orthogonality_penalty(shared, old, config.orth_norm, backend=config.kernel_backend)
        return loss

    def _merge_task(self, adapter_name: str) -> int:
        forced = self.forced_task[adapter_name]
        if forced is not None:
            return forced
        if self.num_tasks(adapter_name) == 1:
            return 0
        names = self.sparta_settings[adapter_name].task_names
        raise ValueError(
            f"Cannot merge SpaRTA adapter '{adapter_name}': it has {len(names)} tasks ({', '.join(names)}) and the "
            "router chooses among them per input, which a single merged weight cannot do. Call "
            "model.set_task(<task name>) first to merge that task's branch with the shared branch."
        )


class Linear(nn.Module, SpaRTALayer):
    """SpaRTA around an `nn.Linear` or a transformers `Conv1D` (``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SpaRTAConfig,
        granularity: str,
        query_dim: Optional[int] = None,
        fan_in_fan_out: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SpaRTALayer.__init__(self, base_layer, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, granularity, query_dim)

    def get_delta_weight(self, adapter_name: str, task: Optional[int] = None) -> torch.Tensor:
        """Weight update of the adapter with task branch ``task`` routed alone, in the base weight's layout."""
        task = self._merge_task(adapter_name) if task is None else task
        weight = self.get_base_layer().weight
        a = self.sparta_A_task[adapter_name][task]
        compute_dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        delta = self.scaling_task[adapter_name] * (
            self.sparta_B_task[adapter_name][task].to(compute_dtype) @ a.to(compute_dtype)
        )
        if adapter_name in self.sparta_A_shared:
            shared_b = self.sparta_B_shared[adapter_name].to(compute_dtype)
            delta = delta + self.scaling_shared[adapter_name] * (
                shared_b @ self.sparta_A_shared[adapter_name].to(compute_dtype)
            )
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_weight = self.get_base_layer().weight
        for adapter_name in adapter_names:
            if adapter_name not in self.sparta_A_task:
                continue
            task = self._merge_task(adapter_name)
            delta = self.get_delta_weight(adapter_name, task)
            if safe_merge:
                merged = base_weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems broken.")
                base_weight.data = merged
            else:
                base_weight.data += delta
            self.merged_task[adapter_name] = task
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.sparta_A_task:
                base_weight.data -= self.get_delta_weight(adapter_name, self.merged_task.pop(adapter_name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if adapter_name in self.sparta_A_task:
                result = result + self.adapter_delta(adapter_name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sparta." + super().__repr__()


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _random_projection(source_dim: int, target_dim: int, reference: torch.Tensor) -> torch.Tensor:
    """Frozen Gaussian projection, a function of the two sizes alone so that it is the same in every process."""
    generator = torch.Generator().manual_seed(source_dim * 100_003 + target_dim)
    projection = torch.randn(source_dim, target_dim, generator=generator) / math.sqrt(target_dim)
    return projection.to(reference.device)


def _orthonormal_complement(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` unit rows orthogonal to the span of ``rows`` and to each other, as far as the dimension allows
    (random with a fixed seed); rows beyond the dimension are random unit rows."""
    generator = torch.Generator().manual_seed(rows.shape[0] * 7919 + rows.shape[1])
    candidates = torch.randn(count, rows.shape[1], generator=generator).to(rows.device)
    if rows.shape[0] + count <= rows.shape[1]:
        basis, _ = torch.linalg.qr(rows.T)
        candidates = candidates - (candidates @ basis) @ basis.T
    orthonormal, _ = torch.linalg.qr(candidates.T)
    return torch.cat([orthonormal.T, F.normalize(candidates[orthonormal.shape[1] :], dim=-1)])


def sparta_layers(module: nn.Module) -> list[SpaRTALayer]:
    """Every SpaRTA layer inside ``module``, in module order."""
    return [child for child in module.modules() if isinstance(child, SpaRTALayer)]
