"""The component router of the paper design (``task_branches="shared"``): per-input sigmoid weights of the two branches
(low-rank shared, high-rank task) from learnable components that grow by a few orthogonal rows per task, as in the
DATA code (arXiv 2502.11482, repository Xnhyacinth/DATA, patch/modeling_llama.py ``get_scale``/``post_prompt_init``).

For one branch with components K, A, W (rows x d, the rows of every task so far) and a layer input of tokens x_t:

    a_t = normalize(A x_t)                                   (one coefficient per row)
    logit_t = sum_k a_t[k] * rowsum(normalize(K))[k] * rowsum(W)[k] / sqrt(d)
    s = sigmoid(sum over the prompt's tokens of logit_t)     (per sequence; per token: sigmoid(logit_t))

This is the code's ``einsum('blk, kd -> blk', a_q, K)`` (which sums K's normalised rows rather than taking the cosine
of x * A_k with K_k as CODA-Prompt's formula does) followed by the sum over tokens and features of ``sim @ W``; the
rowsum reading is the code's, kept here. Padding positions (attention mask 0) are left out of the sum, and so are the
answer's (token labels other than -100): where the DATA code sums over every token in training, the answer would
weigh every position, the first ones included, in training but not in generation, where it does not exist yet.

Each task adds ``router_components`` rows to K, A and W of both branches, drawn at random and orthogonalised against
the earlier rows (Gram-Schmidt); the earlier rows are frozen parameters, so they stay as they were. The router's loss
is DATA's orthogonality penalty mean((T T^T - I)^2) on normalize(K), A and W, averaged over the three matrices and the
two branches, times ``router_orth_lambda``.

Where the DATA code computes the weights once per group of 4 decoder layers from the hidden state entering the group,
this router computes them in every adapted layer from the layer's own input (see `ComponentRouter`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .base import Branches, Router, Routing
from .context import RoutingContext


#: Branch order of the router's blocks and of its weights: the shared (low-rank) branch, then the task (high-rank) one.
BRANCHES = ("shared", "task")


class ComponentRouter(Router):
    """Weighs the shared and the task branch of one layer per input, from that layer's input.

    State (parameters saved with the adapter): ``keys`` (K), ``attention`` (A) and ``components`` (W), one block
    (2, router_components, in_features) per task, block row 0 for the shared branch and 1 for the task branch; the last
    block trains, the others are frozen.

    Per adapted layer rather than per group of decoder layers as in the DATA code: the weights are computed inside the
    layer that uses them, so the state lives in the tuner layer like every other SpaRTA tensor (save/load,
    delete_adapter, FSDP and ZeRO-3 partitioning need nothing more), gradient checkpointing recomputes each layer on its own (weights
    computed in one checkpointed decoder layer and used by the next ones would cross checkpoint regions), and any model
    works, including ones without a list of decoder layers. The price is router parameters in every adapted layer:
    3 * 2 * router_components * in_features per task.

    ``router_granularity``: "sequence" and "auto" give one weight per sequence (the code's default: the sum over the
    sequence's tokens), "token" one weight per token (the code's ``project`` variant). The model routes this router
    per layer ("token" for the model: it needs no sequence query). The per-sequence sum covers the prompt only (see
    the module): in KV-cached generation it is kept with the cache, a forward of several tokens (a chunked prompt)
    adds them, and a decode step adds nothing, so that every answer token is weighted by its prompt, as in training.
    """

    uses_projection = False

    def __init__(self, config, granularity: str, source_dim: int) -> None:
        super().__init__(config, granularity, source_dim)
        self.keys = nn.ParameterList()
        self.attention = nn.ParameterList()
        self.components = nn.ParameterList()

    @property
    def per_sequence(self) -> bool:
        return self.config.router_granularity != "token"

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, A and W of both branches, each (2, rows of every task, in_features), earlier tasks' rows first."""
        return tuple(torch.cat(list(blocks), dim=1) for blocks in (self.keys, self.attention, self.components))

    def branch_weights(self, x: torch.Tensor, context: Optional[RoutingContext], record: bool = False) -> torch.Tensor:
        """The weights (..., 2) of the shared and the task branch for input ``x`` (..., in_features), in (0, 1).

        Per sequence, the weights are (batch, 1, ..., 1, 2) for ``x`` of shape (batch, positions..., in_features) and
        one weight per row for a 2-D ``x``. ``record``: keep the sequence sums in ``context`` for the next decode step.
        """
        logits = component_logits(x, *self.matrices())
        if self.per_sequence and x.dim() > 2:
            logits = self._sequence_logits(logits, context, record)
        return torch.sigmoid(logits)

    def _sequence_logits(self, logits: torch.Tensor, context: Optional[RoutingContext], record: bool) -> torch.Tensor:
        """The sum of the per-token logits over the sequence's prompt: its prompt positions in this forward (label
        -100 when token labels are given, else every position the attention mask keeps) and the cached ones before
        them. A decode step (one new token after cached ones) adds nothing: it is part of the answer, which routing
        never reads, so that an answer token is weighted in generation as in training, and no output depends on
        tokens after it."""
        batch, positions = logits.shape[0], logits.shape[1:-1]
        flat = logits.reshape(batch, -1, logits.shape[-1])
        mask = None if context is None else context.token_mask
        mask = context.valid_mask if mask is None and context is not None else mask
        if mask is not None and tuple(mask.shape) == tuple(flat.shape[:2]):
            flat = flat * mask.to(device=flat.device, dtype=flat.dtype).unsqueeze(-1)
        total = flat.sum(dim=1)
        if context is not None:
            earlier = context.cached_sums.get(self)
            if earlier is not None and tuple(earlier.shape) == tuple(total.shape):
                total = earlier.to(total.device) if flat.shape[1] == 1 else total + earlier.to(total.device)
            if record:
                context.sequence_sums[self] = total.detach()
        return total.view(batch, *([1] * len(positions)), total.shape[-1])

    def route(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches, training: bool) -> Routing:
        """The single task branch with the task weight as its gate, the shared weight, and in training the penalty."""
        weights = self.branch_weights(x, context, record=True)
        loss = self.loss(x, context, branches) if training else None
        return Routing([0], weights[..., 1:], loss, weights[..., :1])

    def decide(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> torch.Tensor:
        """The weights (..., 2) of the shared and the task branch for ``x``, with no side effect."""
        return self.branch_weights(x, context)

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        raise ValueError(
            "The component router (task_branches='shared') has no per-task scores: it weighs the shared and the task "
            "branch of every input (read them with router_gates or RoutingRecorder(quantity='gates'))."
        )

    def loss(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> Optional[torch.Tensor]:
        """``router_orth_lambda`` times DATA's orthogonality penalty of the components (None when the weight is 0)."""
        weight = self.config.router_orth_lambda
        if weight == 0:
            return None
        keys, attention, components = self.matrices()
        penalties = [row_orthogonality(F.normalize(keys, dim=-1)), row_orthogonality(attention)]
        penalties.append(row_orthogonality(components))
        return weight * sum(penalties) / 3

    def add_task(self) -> None:
        """Append ``router_components`` rows per branch to K, A and W, orthogonal to the earlier rows and unit norm.
        Rows of a router whose earlier rows are empty (meta tensors: a load with ``low_cpu_mem_usage=True``, which
        fills every row from the checkpoint) are empty too."""
        count, dim = self.config.router_components, self.query_dim
        for blocks in (self.keys, self.attention, self.components):
            reference = blocks[0] if len(blocks) else None
            if reference is not None and reference.is_meta:
                blocks.append(nn.Parameter(torch.empty(2, count, dim, device="meta", dtype=reference.dtype)))
                continue
            earlier = torch.cat([block.detach() for block in blocks], dim=1) if len(blocks) else None
            block = torch.stack(
                [orthogonal_rows(None if earlier is None else earlier[branch], count, dim) for branch in (0, 1)]
            )
            if reference is not None:
                block = block.to(device=reference.device, dtype=reference.dtype)
            blocks.append(nn.Parameter(block))

    def remove_task(self, index: int) -> None:
        """Drop task ``index``'s rows; the last remaining block is as trainable as the last one was."""
        for name in ("keys", "attention", "components"):
            blocks = getattr(self, name)
            trainable = blocks[-1].requires_grad
            kept = nn.ParameterList([block for task, block in enumerate(blocks) if task != index])
            kept[-1].requires_grad_(trainable)
            setattr(self, name, kept)

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [block for blocks in (self.keys, self.attention, self.components) for block in list(blocks)[:-1]]


def component_logits(
    x: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, components: torch.Tensor
) -> torch.Tensor:
    """Per-token logits (..., 2) of both branches for x (..., d), with K, A, W of shape (2, rows, d) (see the module).

    The sum over the features of ``sim @ W`` only sees W's row sums, and ``sim`` only K's normalised row sums, so the
    logit is a_t . (rowsum(normalize(K)) * rowsum(W)) / sqrt(d); computed in float32.
    """
    x = x.float()
    branches, rows, dim = attention.shape
    coefficients = F.linear(x, attention.float().reshape(branches * rows, dim)).unflatten(-1, (branches, rows))
    coefficients = F.normalize(coefficients, dim=-1)
    row_weights = F.normalize(keys.float(), dim=-1).sum(dim=-1) * components.float().sum(dim=-1)
    return (coefficients * row_weights).sum(dim=-1) / math.sqrt(x.shape[-1])


def row_orthogonality(rows: torch.Tensor) -> torch.Tensor:
    """mean((T T^T - I)^2) of the rows T (..., rows, d), averaged over leading dimensions: 0 for orthonormal rows."""
    gram = rows.float() @ rows.float().transpose(-1, -2)
    identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return (gram - identity).pow(2).mean()


def orthogonal_rows(earlier: Optional[torch.Tensor], count: int, dim: int) -> torch.Tensor:
    """``count`` random unit rows (count, dim), orthogonal to each other and to the rows ``earlier`` (m, dim).

    Gram-Schmidt (through a QR decomposition) of Gaussian rows drawn from torch's generator, after removing their
    component in the span of the earlier rows, as DATA initialises each task's rows. Rows beyond what the dimension
    leaves free (count > dim - m) are random unit rows.
    """
    taken = 0 if earlier is None else min(earlier.shape[0], dim)
    free = min(count, dim - taken)
    candidates = torch.randn(count, dim, dtype=torch.float64)
    rows = F.normalize(candidates, dim=-1)
    if free > 0:
        orthogonal = candidates[:free]
        if taken:
            basis = torch.linalg.qr(earlier.detach().double().T.cpu()).Q
            orthogonal = orthogonal - (orthogonal @ basis) @ basis.T
        rows[:free] = torch.linalg.qr(orthogonal.T).Q.T
    return rows.float()


__all__ = ["BRANCHES", "ComponentRouter", "component_logits", "orthogonal_rows", "row_orthogonality"]
