"""How SpaRTA's regularizers reach the gradient, whatever loss a trainer computes.

Each adapted layer attaches its own penalty (weighted orthogonality loss, and the learned router's loss) to its
output activation, as Megatron-LM attaches MoE auxiliary losses (`MoEAuxLossAutoScaler`): the forward is the
identity, and the backward also sends ``scale`` to the penalty. Any loss computed from the model's outputs (the
model's own, TRL's log-prob losses, fused cross-entropy, a custom loss) therefore trains the penalty, once per
backward and with a weight that the trainer's loss normalisation does not change. ``scale`` is the penalty's share of
one optimizer step: 1 / (gradient-accumulation steps), times the loss scale of fp16 mixed precision.
"""

from __future__ import annotations

import torch


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
