"""How SpaRTA's regularizers reach the gradient, whatever loss a trainer computes.

Each adapted layer attaches its own penalty (weighted orthogonality loss, and the learned router's loss) to its
output activation, as Megatron-LM attaches MoE auxiliary losses (`MoEAuxLossAutoScaler`): the forward is the
identity, and the backward also sends ``scale`` to the penalty. Any loss computed from the model's outputs (the
model's own, TRL's log-prob losses, fused cross-entropy, a custom loss) therefore trains the penalty, once per
backward and with a weight that the trainer's loss normalisation does not change. ``scale`` is the penalty's share of
one optimizer step: 1 / (gradient-accumulation steps), times the loss scale of fp16 mixed precision.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import orthogonality_penalty
from .kernels.backend import resolve_backend
from .kernels.orthogonality_gram import gram_matrix, gram_orthogonality_penalty
from .routers import is_recomputation
from .utils import same_tensor_states, tensor_states


class AttachPenaltyFunction(torch.autograd.Function):
    r"""y = x in forward; in backward dL/dx = dL/dy and dL/dpenalty = scale.

    So backpropagating any loss L that depends on y adds ``scale * d penalty / d theta`` to the gradient of every
    parameter theta of the penalty, exactly as if ``scale * penalty`` had been added to L. Nothing is saved.
    """

    @staticmethod
    def forward(ctx, activation, penalty, scale):
        ctx.scale = scale
        ctx.penalty_dtype, ctx.penalty_device = penalty.dtype, penalty.device
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=ctx.penalty_dtype, device=ctx.penalty_device), None


def attach_penalty(activation: torch.Tensor, penalty: torch.Tensor, scale: float) -> torch.Tensor:
    """``activation`` unchanged, carrying ``penalty`` into every backward that goes through it (see the module)."""
    return AttachPenaltyFunction.apply(activation, penalty, scale)


class LayerRegularizers:
    """The regularizers of a `SpaRTALayer` (mixed into it): the orthogonality penalty between its branches, the
    router's loss, and their attachment to the layer's output in a training forward."""

    def regularizers(self, adapter_name: str, router_loss: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """This layer's weighted regularizers in a training forward: the orthogonality penalty and the router loss."""
        config = self.sparta_settings[adapter_name]
        values = {} if router_loss is None else {"router": router_loss}
        orthogonality = self.orthogonality_loss(adapter_name) if config.orth_lambda > 0 else None
        if orthogonality is not None:
            values["orthogonality"] = config.orth_lambda * orthogonality
        return values

    def _attach_regularizers(self, adapter_name: str, result: torch.Tensor, router_loss) -> torch.Tensor:
        """Report this layer's regularizers and attach them to its output, so that any loss computed from the model's
        outputs trains them (see `peft_sparta.regularizers`)."""
        values = self.regularizers(adapter_name, router_loss)
        if not values:
            return result
        context = self.routing_context
        if context is not None and not is_recomputation():
            context.report(values)
        penalty = sum(values.values())
        if not torch.is_grad_enabled() or not penalty.requires_grad:
            return result
        return attach_penalty(result, penalty, context.penalty_scale if context is not None else 1.0)

    def orthogonality_loss(self, adapter_name: str) -> torch.Tensor | None:
        """Overlap of the trainable down-projections with every other branch of this adapter: the current task's
        against the shared and old ones, and the shared branch's against the old ones while it trains."""
        tasks = list(self.sparta_A_task[adapter_name])
        current, old = tasks[-1], tasks[:-1]
        shared = self._shared_down(adapter_name)
        if not shared + old:
            return None
        loss = self._penalty_against(adapter_name, current, shared + old)
        for block in shared:
            if old and block.requires_grad:
                loss = loss + self._penalty_against(adapter_name, block, old)
        return loss

    def _penalty_against(self, adapter_name: str, left: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        """The orthogonality penalty of ``left`` against ``others``, as one product against a cached summary of the
        frozen ones (`_frozen_summary`) plus one against the trainable ones, which must get their gradient (the
        shared branch while it trains; every block under FSDP, whose views of the flat parameter all require grad).
        The eager backend, the per-branch reference, gets the frozen blocks themselves."""
        config = self.sparta_settings[adapter_name]
        backend = resolve_backend(config.kernel_backend, left)
        frozen = [block for block in others if not block.requires_grad]
        trainable = [block for block in others if block.requires_grad]
        penalties = []
        if len(frozen) > 1 and backend != "eager":
            form, summary = self._frozen_summary(adapter_name, frozen, config.orth_norm)
            if form == "gram":
                penalties.append(gram_orthogonality_penalty(left, summary))
            else:
                penalties.append(orthogonality_penalty(left, summary, config.orth_norm, backend=backend))
        elif frozen:
            penalties.append(orthogonality_penalty(left, frozen, config.orth_norm, backend=backend))
        if trainable:
            penalties.append(orthogonality_penalty(left, trainable, config.orth_norm, backend=backend))
        return penalties[0] if len(penalties) == 1 else penalties[0] + penalties[1]

    def _frozen_summary(self, adapter_name: str, blocks: list[torch.Tensor], norm: str) -> tuple[str, torch.Tensor]:
        """What the penalty needs of the frozen blocks, built once per task instead of at every step, without
        autograd history: their stack ``torch.cat(blocks)`` ("stack"), or, for the Frobenius norm once they hold more
        rows than in_features, their Gram matrix ("gram", see `gram_orthogonality_penalty`), which then costs less
        to multiply and to hold, and the same at any number of tasks.

        Frozen branches do not change while a task trains, so the summary is kept per adapter and rebuilt only when
        a block is another tensor, has other storage or was modified in place (its identity, data pointer and
        version counter are compared): `add_task` and `remove_task` change the blocks, loading a state dict copies
        into them (a new version) or assigns new ones, and moving the layer (`.to()`, which may reuse freed storage)
        clears it. It outlives eval mode, so that a loop that evaluates between training steps does not rebuild it. It is a copy, not views of the blocks, so that FSDP or ZeRO-3 freeing or
        resizing parameter storage between forwards cannot change it under the penalty; it costs the smaller of the
        frozen down-projections' size and in_features^2 elements per layer while it is held.
        """
        rows = sum(block.shape[0] for block in blocks)
        form = "gram" if norm == "fro" and rows > blocks[0].shape[-1] else "stack"
        key = tensor_states(blocks)
        cached = self.sparta_frozen_summary.get(adapter_name)
        if cached is None or cached[1] != form or not same_tensor_states(cached[0], key):
            summary = gram_matrix(blocks) if form == "gram" else torch.cat(blocks)
            cached = self.sparta_frozen_summary[adapter_name] = (key, form, summary)
        return form, cached[2]
