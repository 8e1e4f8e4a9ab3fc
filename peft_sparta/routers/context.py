"""What every SpaRTA layer of a model needs to route one forward: the sequence query, the prompt mask and the router
losses of that forward, computed once per forward by the model's pre-hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..utils import masked_mean


#: Attribute of a KV cache that holds the sequence query decided at its prefill, which its decode steps reuse.
CACHED_QUERY = "_sparta_sequence_query"

#: Attribute of a KV cache that holds the component routers' per-sequence sums over the tokens it holds.
CACHED_SUMS = "_sparta_sequence_sums"

#: Label of the positions that carry no target (PyTorch's cross-entropy default, used by transformers and TRL).
IGNORE_INDEX = -100


@dataclass
class RoutingContext:
    """What the SpaRTA layers of one model share: per forward, the routing inputs computed once by the model and the
    regularizer values the layers report; across forwards, the regularizers' gradient weight.

    sequence_query: (batch, dim) masked mean of the input embeddings, for sequence routing.
    token_mask: (batch, seq) bool, positions whose queries build the router state in training (the prompt part).
    valid_mask: (batch, seq) bool, the positions the attention mask keeps (all when none is given).
    sequence_sums: per component router, its per-sequence sums (batch, 2) over this forward's tokens and the cached
        ones before them, kept with the KV cache for the next decode step (see `ComponentRouter`).
    cached_sums: the same sums read from the KV cache that a decode step continues.
    sequence_gates: per router state and settings, the inference gates of this forward under sequence routing,
        computed by the first layer that routes and read by the others (see `Router.decide`).
    regularization: the weighted regularizers of this forward, summed over layers (detached, for logging).
    penalty_scale: weight of the regularizers' gradient in each backward (see `peft_sparta.regularizers`).
    """

    sequence_query: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    valid_mask: Optional[torch.Tensor] = None
    sequence_sums: dict = field(default_factory=dict)
    cached_sums: dict = field(default_factory=dict)
    sequence_gates: dict = field(default_factory=dict)
    regularization: dict[str, torch.Tensor] = field(default_factory=dict)
    penalty_scale: float = 1.0

    def clear(self) -> None:
        self.sequence_query = None
        self.token_mask = None
        self.valid_mask = None
        self.sequence_sums = {}
        self.cached_sums = {}
        self.sequence_gates = {}
        self.regularization = {}

    def report(self, values: dict[str, torch.Tensor]) -> None:
        """Add one layer's regularizer values to this forward's totals."""
        for name, value in values.items():
            total = self.regularization.get(name)
            self.regularization[name] = value.detach() if total is None else total + value.detach()

    def begin_forward(self, args: tuple, kwargs: dict, embeddings: Optional[nn.Embedding], sequence: bool) -> None:
        """Set the context from a model call's arguments; ``sequence``: whether any layer routes per sequence.

        A generation decode step keeps the sequence query decided from its own prompt at prefill, read from the KV
        cache it continues (so interleaved conversations, each with its cache, keep their own routing); a decode step
        whose cache holds no query is routed from its new tokens. It also reads the component routers' sums over the
        cached tokens, to which it adds its own.
        """
        self.regularization, self.sequence_gates = {}, {}
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None or tokens.dim() < 2:
            self.clear()
            return
        batch, length = tokens.shape[:2]
        self.sequence_sums, self.cached_sums, self.valid_mask = {}, {}, None
        if extends_cached_sequence(kwargs, length):
            self.cached_sums = dict(getattr(kv_cache(kwargs), CACHED_SUMS, {}))
            cached = getattr(kv_cache(kwargs), CACHED_QUERY, None)
            if cached is not None and cached.shape[0] == batch:
                self.sequence_query, self.token_mask = cached, None
                return
        valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
            valid = attention_mask.bool()
        self.valid_mask = valid
        self.token_mask = prompt_mask(valid, kwargs.get("labels"))
        self.sequence_query = None
        if sequence:
            with torch.no_grad():
                embedded = inputs_embeds if inputs_embeds is not None else embeddings(input_ids)
                self.sequence_query = masked_mean(embedded, self.token_mask)


def prompt_mask(valid: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Positions whose queries describe the input: with token labels, the prompt part (label -100) only, since test
    inputs carry no answer; rows without such a part, and inputs without token labels, use every valid position."""
    if labels is None or tuple(labels.shape) != tuple(valid.shape):
        return valid
    prompt = valid & (labels == IGNORE_INDEX)
    has_prompt = prompt.any(dim=1, keepdim=True)
    return torch.where(has_prompt, prompt, valid)


def kv_cache(arguments: dict):
    """The KV cache among a model call's arguments or outputs (``cache`` since transformers 5, else
    ``past_key_values``), or None."""
    cache = arguments.get("cache")
    return cache if cache is not None else arguments.get("past_key_values")


def extends_cached_sequence(kwargs: dict, length: int) -> bool:
    """Whether a forward continues a sequence whose earlier tokens sit in a KV cache (a generation decode step).

    The attention mask, when given, is longer than the new tokens; transformers drops an all-ones mask, so a cache
    that already holds tokens says the same."""
    attention_mask = kwargs.get("attention_mask")
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and attention_mask.shape[1] > length:
        return True
    cached_length = getattr(kv_cache(kwargs), "get_seq_length", None)
    return cached_length is not None and cached_length() > 0
