"""Configuration of SpaRTA adapters."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from .errors import SpaRTALoadError
from .kernels import BACKENDS, NORMS, Backend, Norm


#: SpaRTA's member of PEFT's `PeftType` (added by `registration`, which `import peft_sparta` runs first).
PEFT_TYPE = "SPARTA"

#: Version of the saved adapter format; bumped whenever a saved adapter cannot be read by older code. The newest
#: version, read and written by this code.
FORMAT_VERSION = 7

#: The version per-task adapters (``task_branches="per_task"``) are written in, which releases before version 4 read.
PER_TASK_FORMAT_VERSION = 3

#: The version of adapters with ``task_branches="shared"``, which releases before it would read as per-task ones.
SHARED_BRANCH_FORMAT_VERSION = 4

#: The version of prototype-router adapters, which may hold the query spread (``query_scatter``, a tensor releases
#: before version 5 reject); older adapters load without it (`checkpoint.add_missing_query_spread`).
QUERY_SCATTER_FORMAT_VERSION = 5

#: The version of prototype-router adapters saved with ``router_metric="cosine"``: under sequence routing they hold the
#: query spread whatever the metric (version 5 kept it only for a router built with the discriminant metric, so its
#: readers reject it under "cosine"); version 5 and older load without it (`checkpoint.add_missing_query_spread`).
COSINE_QUERY_SCATTER_FORMAT_VERSION = 6

#: The version of prototype-router adapters, whatever the metric: the query spread is kept per task (``query_scatter``
#: (tasks, d, d), ``query_count`` (tasks,)), so that removing a task removes its share; older versions pooled it over
#: the tasks and load as every task holding the pooled spread (`checkpoint.split_pooled_query_spread`).
PER_TASK_QUERY_SCATTER_FORMAT_VERSION = 7

#: Fields read at every forward, so that changing them on `peft_config` takes effect at once.
RUN_TIME_FIELDS = frozenset(
    [
        "router_temperature",
        "router_abstain_threshold",
        "router_abstain_spread",
        "router_metric",
        "top_k",
        "router_min_gate",
        "orth_lambda",
        "router_lambda",
        "router_orth_lambda",
        "dropout",
        "kernel_backend",
        "recompute_activations",
    ]
)

#: The per-task floor's k of ``router_abstain_spread="auto"``, chosen on the calibration splits of the benchmark's
#: four offline suites (benchmarks/router_alternatives.py, never on scored data): of the k that keep 99% of every
#: suite's calibration task prompts, the one that abstains most on their unrelated text (benchmarks/README.md).
DEFAULT_ABSTAIN_SPREAD = 4.0

#: Default ``router_min_gate``: branches under 1% of an input's router mass are not computed at inference, so that
#: its cost follows the branches an input uses rather than the number of tasks (benchmarks/README.md).
DEFAULT_MIN_GATE = 0.01

#: The smallest ``router_temperature``: the router divides similarities (at most 4 apart) by it, which must stay far
#: from float32's overflow (a temperature of 1e-45 turns them into inf and the gates into NaN). At this temperature
#: the gates are already one-hot for similarities 1e-4 apart.
MIN_ROUTER_TEMPERATURE = 1e-6

RouterName = Literal["prototype", "learned", "spectral", "components"]
RouterMetric = Literal["auto", "cosine", "discriminant"]
TaskBranches = Literal["per_task", "shared"]
Granularity = Literal["auto", "token", "sequence"]
SharedUpdate = Literal["train", "freeze_after_first"]
Bias = Literal["none", "all", "sparta_only"]


@dataclass
class SpaRTAConfig(PeftConfig):
    """
    This is the configuration class to store the configuration of a [`SpaRTAModel`].

    SpaRTA ("Spectral Disentanglement: Rank-Aware Task Adaptation for Rehearsal-free Continual Learning in LLMs",
    ACL 2026) splits the update of every adapted weight into a low-rank branch shared by all tasks and one high-rank
    branch per task, kept in mutually orthogonal subspaces, and weighs the task branches with a router so that no task
    id is needed at inference. ``task_branches="shared"`` (with ``router="components"``, see `paper_design`) is the
    design of the authors' public code instead: one low-rank and one high-rank branch trained on every task, weighed
    per input by a router that grows by a few components per task.

    Args:
        r_shared (`int`, *optional*, defaults to `8`):
            Rank of the shared branch. 0 disables the shared branch.
        r_task (`int`, *optional*, defaults to `32`):
            Rank of each task branch.
        alpha_shared (`float`, *optional*, defaults to `16`):
            Scaling numerator of the shared branch: scale = alpha_shared / r_shared (or / sqrt(r_shared) with rsLoRA).
        alpha_task (`float`, *optional*, defaults to `64`):
            Scaling numerator of the task branches: scale = alpha_task / r_task (or / sqrt(r_task) with rsLoRA).
        use_rslora (`bool`, *optional*, defaults to `False`):
            Use rank-stabilised scaling alpha / sqrt(r).
        dropout (`float`, *optional*, defaults to `0.0`):
            Dropout probability on the adapter input.
        target_modules (`Union[list[str], str]`, *optional*):
            Names or regex of the modules to adapt, as in LoRA. `nn.Linear` and transformers `Conv1D` are supported.
        exclude_modules (`Union[list[str], str]`, *optional*):
            Names or regex of the modules not to adapt.
        layers_to_transform (`Union[list[int], int]`, *optional*):
            Layer indices to adapt, as in LoRA.
        layers_pattern (`Union[list[str], str]`, *optional*):
            Name of the layer list used with `layers_to_transform`.
        init_weights (`bool | "spectral"`, *optional*, defaults to `True`):
            True: B zero and A Kaiming as in LoRA, so a fresh branch changes nothing. "spectral": B zero and A taken
            from consecutive slices of the right singular vectors of the base weight, so all branches start exactly
            orthogonal. False: random non-zero B (for tests only).
        router (`str`, *optional*, defaults to `"prototype"`):
            "prototype": parameter-free nearest-prototype router built from each task's inputs. "learned": one
            trainable key per task trained with the router loss. "spectral": training-free, routes by the projection
            of the input on each task branch's top right singular vectors. "components" (only with
            ``task_branches="shared"``): sigmoid weights of the shared and the task branch from learnable components
            (keys, attention vectors and weights; `peft_sparta.routers.ComponentRouter`) that each adapted layer
            computes from its own input, ``router_components`` new rows per task, earlier rows frozen.
        router_granularity (`str`, *optional*, defaults to `"auto"`):
            "token": every layer routes every token from its own input. "sequence": one query per input from the
            masked mean of the input embeddings, shared by all layers. "auto": sequence when the base model has input
            embeddings and the router is not spectral, token otherwise. With ``router="components"``: "sequence" and
            "auto" weigh the branches once per sequence (sum over its tokens, as the DATA code), "token" per token.
        router_dim (`int`, *optional*):
            If set, queries go through a frozen random projection to this size before routing.
        router_temperature (`float`, *optional*, defaults to `0.02`):
            Softmax temperature over the tasks' best cosine similarities (after the discriminant transform under
            ``router_metric="discriminant"``); at least `MIN_ROUTER_TEMPERATURE` (1e-6).
        router_prototypes (`int`, *optional*, defaults to `16`):
            Prototypes per task (online k-means centroids of the task's queries; singular vectors for "spectral").
            The README's benchmark section shows how the number of prototypes affects routing.
        top_k (`int`, *optional*):
            Compute only the k best task branches per input at inference; None mixes all tasks.
        router_min_gate (`float`, *optional*, defaults to `DEFAULT_MIN_GATE`):
            At inference, a task branch whose gate for an input is below this value is left out for that input and
            the other gates are renormalised (an input's best branch is always kept), so that inference computes
            the branches that matter, not every task's. 0 mixes every branch. In [0, 1).
        router_abstain_threshold (`float`, *optional*):
            At inference, an input whose best cosine similarity to every task (its prototypes, key or singular
            directions) is below this value goes to no task branch: only the base model and the shared branch act on
            it, which keeps text that resembles no trained task close to the base model. None routes every input to
            some task. The right value depends on the data: measure your tasks' scores and those of text that should
            abstain with `peft_sparta.continual.RoutingRecorder(model, quantity="scores")` (README: "Inputs that
            resemble no task").
        router_abstain_spread (`float` or `"auto"`, *optional*, defaults to `"auto"`):
            Prototype router: at inference, an input abstains (base model and shared branch only) when its best
            similarity to every task is below that task's own floor, 1 - k * (1 - m), where m is the mean similarity
            of the task's training queries to their prototypes (the spread of its prototypes) and k is this value.
            Unlike ``router_abstain_threshold`` the floor needs no data besides the training run, and it follows each
            task's own spread: a task whose prompts vary keeps a lower floor than a task whose prompts are alike.
            "auto": `DEFAULT_ABSTAIN_SPREAD` for the prototype router under sequence routing, where the benchmark's
            calibration splits chose it (README: "Inputs that resemble no task"), and no floor otherwise (token
            routing, other routers). None: no floor.
        router_metric (`str`, *optional*, defaults to `"auto"`):
            How the prototype router compares a query with the prototypes when it chooses among tasks (the gates'
            softmax and top_k). "cosine": cosine similarity. "discriminant": cosine similarity after centring on the
            tasks' mean and whitening by the spread of each task's training queries around its own mean (shrunk
            towards the identity), as in linear discriminant analysis: what a task's own prompts vary in (names,
            numbers, topic words) counts less than what tells tasks apart, so prompts that differ in one instruction
            word route apart. Its similarities are scaled by ``DISCRIMINANT_SCORE_SCALE`` (0.25) before the softmax,
            so that the default temperature leaves text of no task as mixed as the cosine does. The spread comes from
            the prototypes and, under sequence routing, one (d, d) matrix kept in training under any metric (so that
            the metric can be switched at any time) and saved with the adapter (``query_scatter``: how queries spread
            around their prototype, d the query size); the transform is
            computed again once per change of them, and costs one triangular solve per query. Abstaining
            (``router_abstain_threshold``, ``router_abstain_spread``) always compares the plain cosine similarity. "auto": "discriminant" for the
            prototype router under sequence routing, "cosine" otherwise (under token routing the solve would run for
            every token of every layer).
        orth_lambda (`float`, *optional*, defaults to `0.0`):
            Weight of the orthogonality loss between the current task branch, the shared branch and old branches
            (the paper's subspace penalty). Off by default: old branches are frozen and routed apart, so the loss
            does not keep old tasks better, and it cost learning in every benchmark suite where it had any effect
            (README: "Where learning is lost"). Turn it on where inputs mix branches (large ``router_temperature``,
            token routing); ``paper_design`` sets 0.5.
        orth_norm (`str`, *optional*, defaults to `"fro"`):
            "fro": squared Frobenius norm of A_i A_j^T; "l1": element-wise absolute sum (O-LoRA's form).
        router_lambda (`float`, *optional*, defaults to `0.1`):
            Weight of the router loss (learned router only).
        kernel_backend (`str`, *optional*):
            The implementation of the adapter computation on this machine: "eager" (per-branch reference, for
            debugging), "torch" (fused autograd Function) or "triton" (fused, Triton kernels on CUDA; fails loudly
            where it cannot run). None or "auto": the env var SPARTA_KERNEL_BACKEND if set, else Triton for CUDA
            tensors when installed, checked against the fused torch path on its first call per process and dtype
            (one warning and the torch path if it fails), else the fused torch path. The backend is the machine's
            choice, not the adapter's: the value is written to adapter_config.json as a record of the training run,
            but ignored when an adapter is loaded (every config read from a file has None, whatever name it holds), so
            an adapter trained with "triton"
            loads and runs on a CPU-only machine and uses the guarded default on CUDA. Set it at run time on the
            loaded config (``model.peft_config[name].kernel_backend``) or with SPARTA_KERNEL_BACKEND. It chooses the
            training path: inference that wants no gradient runs the stacked inference path with every backend.
        recompute_activations (`bool`, *optional*, defaults to `False`):
            Activation memory against time in training. False: every adapted layer keeps its down-projection
            dropout(x) A^T for backward, N x (r_shared + r_task) elements for N tokens, as much as PEFT's LoRA of that
            rank keeps. True: backward recomputes it from the layer input, which it keeps anyway, saving that memory
            for one more (N x in_features x rank) GEMM per layer. Read at every forward; the eager backend ignores it.
        shared_update (`str`, *optional*, defaults to `"freeze_after_first"`):
            "freeze_after_first": the shared branch trains with the first task and is frozen by the first `add_task`,
            so that later tasks cannot drift the outputs of old tasks through it (the README's ablations measure the
            difference); "train": it trains on every task (required by ``task_branches="shared"``).
        task_branches (`str`, *optional*, defaults to `"per_task"`):
            "per_task": one high-rank branch per task, frozen once the task is over (SpaRTA's default here).
            "shared": the paper design of the authors' public code (DATA, arXiv 2502.11482): a single high-rank branch
            (rank ``r_task``) beside the low-rank one (``r_shared``), both trained on every task, so the adapter does
            not grow with tasks; each input weighs them with the component router (``router="components"``, and
            ``shared_update="train"``). ``orth_lambda`` then weighs the subspace penalty ||A_task A_shared^T||. There
            is one branch to route to, so ``top_k`` and ``router_abstain_threshold`` do not apply; `set_task` (any
            task) fixes both weights at 1, which makes the adapter a LoRA of rank r_shared + r_task and mergeable.
        router_components (`int`, *optional*, defaults to `8`):
            Rows each task adds to every component matrix of the component router (per branch).
        router_orth_lambda (`float`, *optional*, defaults to `1.0`):
            Weight of the component router's orthogonality penalty mean((T T^T - I)^2) on its keys, attention vectors
            and weights (DATA's ``ortho_mu``).
        restore_every (`int`, *optional*):
            Stochastic restoration (from the DATA code): every ``restore_every`` optimizer steps, each trainable entry
            of the branches is reset, with probability ``restore_prob``, to its value at the start of the task's
            training. Applied after every optimizer step that updates the adapter (any training loop, no callback
            needed) or by ``model.restore_stochastically()``. None turns it off.
        restore_prob (`float`, *optional*, defaults to `1e-5`):
            Probability that stochastic restoration resets an entry (DATA's value).
        task_names (`list[str]`, *optional*):
            Names of the tasks, in order; the last one is the task being trained. Defaults to `["task_0"]`.
            Maintained by `add_task` and saved with the adapter.
        modules_to_save (`list[str]`, *optional*):
            Modules apart from the adapter layers to train and save.
        bias (`str`, *optional*, defaults to `"none"`):
            "none", "all" or "sparta_only": which biases are trained.
        format_version (`int`):
            Version of the saved adapter format, written automatically. A config that holds one was read from a file
            (its ``kernel_backend`` is then ignored).
        task_names_digest (`str`, *optional*):
            Digest of ``task_names``, written automatically when the adapter is saved: a config whose task names do
            not match it (renamed or reordered in adapter_config.json, which would swap the tasks' branches) raises a
            `SpaRTALoadError`.
    """

    r_shared: int = field(default=8, metadata={"help": "Rank of the shared branch; 0 disables it."})
    r_task: int = field(default=32, metadata={"help": "Rank of each task branch."})
    alpha_shared: float = field(default=16, metadata={"help": "Scaling numerator of the shared branch."})
    alpha_task: float = field(default=64, metadata={"help": "Scaling numerator of the task branches."})
    use_rslora: bool = field(default=False, metadata={"help": "Use rank-stabilised scaling alpha / sqrt(r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or regex of the modules to adapt (nn.Linear, transformers Conv1D)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or regex of the modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt, as in LoRA."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with `layers_to_transform`."}
    )
    init_weights: Union[bool, Literal["spectral"]] = field(
        default=True,
        metadata={
            "help": "True: B zero, A Kaiming (a fresh branch is a no-op). 'spectral': B zero, A from the base "
            "weight's singular vectors, branches exactly orthogonal. False: random non-zero B (tests only)."
        },
    )
    router: RouterName = field(
        default="prototype",
        metadata={"help": "Router: 'prototype', 'learned', 'spectral', or 'components' (task_branches='shared')."},
    )
    router_granularity: Granularity = field(
        default="auto", metadata={"help": "Routing granularity: 'auto', 'token' or 'sequence'."}
    )
    router_dim: Optional[int] = field(
        default=None, metadata={"help": "Size of a frozen random projection of the queries; None keeps them."}
    )
    router_temperature: float = field(default=0.02, metadata={"help": "Softmax temperature of the router."})
    router_prototypes: int = field(default=16, metadata={"help": "Prototypes per task (online k-means centroids)."})
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Compute only the k best task branches at inference; None mixes all."}
    )
    router_min_gate: float = field(
        default=DEFAULT_MIN_GATE,
        metadata={"help": "Gates below this are dropped at inference and the rest renormalised; 0 mixes all."},
    )
    router_abstain_threshold: Optional[float] = field(
        default=None,
        metadata={
            "help": "At inference, inputs whose best cosine similarity to every task is below this value use no task "
            "branch (base model + shared branch only); None routes every input to some task."
        },
    )
    router_abstain_spread: Optional[Union[float, Literal["auto"]]] = field(
        default="auto",
        metadata={
            "help": "Prototype router: at inference, inputs below every task's floor 1 - k * (1 - mean training "
            "similarity to its prototypes), k this value, use no task branch. 'auto': DEFAULT_ABSTAIN_SPREAD for "
            "the prototype router under sequence routing, none otherwise; None: no per-task floor."
        },
    )
    router_metric: RouterMetric = field(
        default="auto",
        metadata={
            "help": "Prototype router: how a query is compared with the prototypes to choose among tasks. 'cosine', "
            "or 'discriminant' (cosine after centring on the tasks' mean and whitening by each task's own spread, "
            "so that what separates tasks counts more than what varies within one); abstaining always uses the "
            "cosine. 'auto': 'discriminant' under sequence routing, 'cosine' under token routing."
        },
    )
    orth_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight of the orthogonality loss between branches (the paper's subspace penalty); 0: off."},
    )
    orth_norm: Norm = field(default="fro", metadata={"help": "Orthogonality norm: 'fro' or 'l1'."})
    router_lambda: float = field(default=0.1, metadata={"help": "Weight of the router loss (learned router)."})
    kernel_backend: Optional[Backend] = field(
        default=None,
        metadata={
            "help": "Adapter computation on this machine: 'eager' (per-branch reference), 'torch' (fused Function), "
            "'triton' (fused, CUDA, loud on failure); None picks the env var SPARTA_KERNEL_BACKEND, else triton on "
            "CUDA when installed (checked once against torch, falling back with a warning), else torch. A run-time "
            "setting: saved as a record of the training run but ignored at load, so adapters run on any machine. "
            "Inference without gradients runs the stacked inference path with every backend."
        },
    )
    recompute_activations: bool = field(
        default=False,
        metadata={
            "help": "True: recompute each adapted layer's down-projection (N x (r_shared + r_task) elements) in "
            "backward instead of keeping it, one more GEMM per layer; False keeps it, as LoRA does."
        },
    )
    shared_update: SharedUpdate = field(
        default="freeze_after_first",
        metadata={
            "help": "Shared branch across tasks: 'freeze_after_first' (trained with the first task) or 'train'."
        },
    )
    task_branches: TaskBranches = field(
        default="per_task",
        metadata={
            "help": "'per_task': one high-rank branch per task, frozen after it. 'shared': the paper design (DATA "
            "code): one low-rank and one high-rank branch trained on every task, weighed per input by the component "
            "router (router='components', shared_update='train')."
        },
    )
    router_components: int = field(
        default=8, metadata={"help": "Rows each task adds to the component router's matrices (per branch)."}
    )
    router_orth_lambda: float = field(
        default=1.0, metadata={"help": "Weight of the component router's orthogonality penalty (DATA's ortho_mu)."}
    )
    restore_every: Optional[int] = field(
        default=None,
        metadata={
            "help": "Stochastic restoration: every this many optimizer steps, reset each trainable branch entry to "
            "its value at the task's start with probability restore_prob. None: off."
        },
    )
    restore_prob: float = field(default=1e-5, metadata={"help": "Probability of resetting an entry at restoration."})
    task_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Task names in order; the last is being trained. Saved with the adapter."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules apart from the adapter layers to train and save."}
    )
    bias: Bias = field(default="none", metadata={"help": "Trained biases: 'none', 'all' or 'sparta_only'."})
    format_version: Optional[int] = field(
        default=None, metadata={"help": "Version of the saved adapter format, written automatically."}
    )
    task_names_digest: Optional[str] = field(
        default=None,
        metadata={"help": "Digest of task_names, written automatically: an edited task list raises at load."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE)
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.task_names, (str, bytes)):
            raise ValueError(f"task_names must be a list of task names, got the string {self.task_names!r}.")
        self.task_names = list(self.task_names) if self.task_names is not None else ["task_0"]
        if self.format_version is None:
            self.format_version = FORMAT_VERSION
        else:  # read from a file, by any loader: the backend is the machine's choice (see kernel_backend)
            self.kernel_backend = None
        self._validate()
        self._check_task_names_digest()
        self.__dict__["_validated"] = True

    def _check_task_names_digest(self) -> None:
        """A saved config's task names are the ones it was saved with; the digest has done its work once checked."""
        digest, self.task_names_digest = self.task_names_digest, None
        if digest is not None and digest != task_names_digest(self.task_names):
            raise SpaRTALoadError(
                f"task_names in adapter_config.json ({self.task_names}) are not the names this adapter was saved "
                "with: they were edited (renamed, reordered, added or removed, which would give tasks other tasks' "
                "branches), or adapter_config.json and the weights file come from different saves. Restore the "
                "adapter_config.json saved with the weights."
            )

    @classmethod
    def paper_design(cls, **kwargs) -> SpaRTAConfig:
        """The design of the authors' public code (DATA, arXiv 2502.11482), which SpaRTA's paper builds on: one
        low-rank (rank 4) and one high-rank (rank 16) branch per adapted layer, scale 1, both trained on every task and weighed
        per sequence by the component router (8 rows per task, orthogonality weight 1), plus the abstract's subspace
        penalty (``orth_lambda`` 0.5). Stochastic restoration stays off, as in the code's published runs; ``kwargs`` override any
        field (e.g. ``target_modules``, ``restore_every``)."""
        design = {
            "task_branches": "shared",
            "router": "components",
            "shared_update": "train",
            "r_shared": 4,
            "r_task": 16,
            "alpha_shared": 4,
            "alpha_task": 16,
            "router_components": 8,
            "router_orth_lambda": 1.0,
            "orth_lambda": 0.5,
        }
        return cls(**{**design, **kwargs})

    def to_dict(self) -> dict:
        """The config as saved: ``format_version`` is the version of the files written now (the oldest that holds this
        adapter, see the ``*_FORMAT_VERSION`` constants), also for an adapter that was loaded from an older version."""
        version = SHARED_BRANCH_FORMAT_VERSION if self.task_branches == "shared" else PER_TASK_FORMAT_VERSION
        if self.router == "prototype":
            version = PER_TASK_QUERY_SCATTER_FORMAT_VERSION
        return {
            **super().to_dict(),
            "format_version": version,
            "task_names_digest": task_names_digest(self.task_names),
        }

    def __setattr__(self, name: str, value) -> None:
        """Store numbers of other libraries (numpy, torch scalars) as Python numbers, and validate the settings that
        are read at run time (e.g. ``router_abstain_threshold``) when they are changed after construction; an invalid
        value raises and the old one stays."""
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
            value = int(value) if isinstance(value, numbers.Integral) else float(value)
        previous = self.__dict__.get(name)
        super().__setattr__(name, value)
        if name in RUN_TIME_FIELDS and self.__dict__.get("_validated"):
            try:
                self._validate()
            except ValueError:
                super().__setattr__(name, previous)
                raise

    def _validate(self) -> None:
        _check_int("r_shared", self.r_shared, minimum=0)
        _check_int("r_task", self.r_task, minimum=1)
        _check_positive("alpha_shared", self.alpha_shared)
        _check_positive("alpha_task", self.alpha_task)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}.")
        _check_choice("init_weights", self.init_weights, (True, False, "spectral"))
        _check_choice("router", self.router, get_args(RouterName))
        _check_choice("router_granularity", self.router_granularity, get_args(Granularity))
        if self.router == "spectral" and self.router_granularity == "sequence":
            raise ValueError(
                "router_granularity='sequence' cannot be used with router='spectral': the spectral router scores each "
                "layer's own input against its branch's singular vectors. Use router_granularity 'token' or 'auto'."
            )
        if self.router_dim is not None:
            _check_int("router_dim", self.router_dim, minimum=1)
        if not _is_finite_number(self.router_temperature) or not self.router_temperature >= MIN_ROUTER_TEMPERATURE:
            raise ValueError(
                f"router_temperature must be a finite number >= {MIN_ROUTER_TEMPERATURE} (smaller values overflow the "
                f"router's softmax), got {self.router_temperature!r}."
            )
        _check_int("router_prototypes", self.router_prototypes, minimum=1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=1)
        if not _is_finite_number(self.router_min_gate) or not 0 <= self.router_min_gate < 1:
            raise ValueError(
                f"router_min_gate must be a number in [0, 1) (0 mixes every task branch), got {self.router_min_gate!r}."
            )
        if self.router_abstain_threshold is not None:
            _check_cosine("router_abstain_threshold", self.router_abstain_threshold)
        self._validate_abstain_spread()
        _check_choice("router_metric", self.router_metric, get_args(RouterMetric))
        if self.router_metric == "discriminant" and self.router != "prototype":
            raise ValueError(
                f"router_metric='discriminant' whitens by the spread of the prototype router's prototypes, which "
                f"router={self.router!r} lacks; use router='prototype' or router_metric='auto'."
            )
        _check_non_negative("orth_lambda", self.orth_lambda)
        _check_choice("orth_norm", self.orth_norm, NORMS)
        _check_non_negative("router_lambda", self.router_lambda)
        _check_choice("shared_update", self.shared_update, get_args(SharedUpdate))
        _check_choice("task_branches", self.task_branches, get_args(TaskBranches))
        self._validate_paper_design()
        _check_int("router_components", self.router_components, minimum=1)
        _check_non_negative("router_orth_lambda", self.router_orth_lambda)
        if self.restore_every is not None:
            _check_int("restore_every", self.restore_every, minimum=1)
        if not _is_finite_number(self.restore_prob) or not 0.0 <= self.restore_prob <= 1.0:
            raise ValueError(f"restore_prob must be a probability in [0, 1], got {self.restore_prob!r}.")
        _check_choice("kernel_backend", self.kernel_backend, (None, *BACKENDS))
        _check_choice("recompute_activations", self.recompute_activations, (True, False))
        _check_choice("bias", self.bias, get_args(Bias))
        self._validate_task_names()
        _check_int("format_version", self.format_version, minimum=1)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This adapter was saved in SpaRTA format version {self.format_version}, but the installed "
                f"peft-sparta-cl reads versions up to {FORMAT_VERSION}. Upgrade peft-sparta-cl to load it."
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both or neither.")

    def _validate_abstain_spread(self) -> None:
        """The per-task floor reads the spread of the prototype router's prototypes, which other routers lack."""
        spread = self.router_abstain_spread
        if spread is None or (isinstance(spread, str) and spread == "auto"):
            return
        if not _is_finite_number(spread) or not spread > 0:
            raise ValueError(f"router_abstain_spread must be a finite number > 0, 'auto' or None, got {spread!r}.")
        if self.router != "prototype":
            raise ValueError(
                f"router_abstain_spread sets each task's floor from the spread of its prototypes, which only "
                f"router='prototype' has (got router={self.router!r}); use router_abstain_threshold instead."
            )

    def _validate_paper_design(self) -> None:
        """``task_branches="shared"`` goes with the component router, a trained shared branch and no task choice."""
        shared = self.task_branches == "shared"
        if shared != (self.router == "components"):
            raise ValueError(
                "task_branches='shared' (the paper design: one low-rank and one high-rank branch trained on every "
                "task) goes with router='components', and router='components' with task_branches='shared'; got "
                f"task_branches={self.task_branches!r}, router={self.router!r}. SpaRTAConfig.paper_design(...) sets "
                "both."
            )
        if not shared:
            return
        if self.shared_update != "train":
            raise ValueError(
                "task_branches='shared' trains both branches on every task: set shared_update='train' (got "
                f"{self.shared_update!r})."
            )
        if self.r_shared < 1:
            raise ValueError("task_branches='shared' needs the low-rank branch: r_shared must be >= 1, got 0.")
        for name in ("top_k", "router_abstain_threshold"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name} chooses among task branches; task_branches='shared' has a single one, so {name} must be "
                    f"None (got {getattr(self, name)!r})."
                )

    def _validate_task_names(self) -> None:
        names = self.task_names
        if not names or not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"task_names must be a non-empty list of non-empty strings, got {names!r}.")
        if len(set(names)) != len(names):
            raise ValueError(f"task_names must be unique, got {names!r}.")


def task_names_digest(task_names: list[str]) -> str:
    """A short digest of the task names in order, saved with them to tell an edited task list."""
    return hashlib.sha256(json.dumps(list(task_names)).encode()).hexdigest()[:16]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _is_finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_positive(name: str, value) -> None:
    if not _is_finite_number(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_non_negative(name: str, value) -> None:
    if not _is_finite_number(value) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def _check_cosine(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a cosine similarity in [-1, 1] (or None), got {value!r}.")


def _check_choice(name: str, value, allowed: tuple) -> None:
    def matches(choice) -> bool:
        # bools compare by identity so that 1 is not taken for True
        return value is choice if isinstance(choice, bool) or isinstance(value, bool) else value == choice

    if not any(matches(choice) for choice in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
