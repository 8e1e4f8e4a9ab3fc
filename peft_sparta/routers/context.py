"""What every SpaRTA layer of a model needs to route one forward: the sequence query, the prompt mask and the router
losses of that forward, computed once per forward by the model's pre-hook."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..utils import masked_sum


#: Attribute of a KV cache that holds the sequence query decided by its last forward of several tokens (the prefill),
#: which its decode steps reuse.
CACHED_QUERY = "_sparta_sequence_query"

#: Attribute of a KV cache that holds the component routers' per-sequence sums over the tokens it holds.
CACHED_SUMS = "_sparta_sequence_sums"

#: Attribute of a KV cache that holds the sequence-routing decisions of its prefill (gates and selected branches),
#: which its decode steps reuse without scoring again.
CACHED_DECISIONS = "_sparta_sequence_decisions"

#: Attribute of a KV cache that holds the sum of the embeddings of the tokens it holds and their number, per sequence.
CACHED_EMBEDDING_SUMS = "_sparta_embedding_sums"

#: Warned when a forward of several tokens continues a KV cache (see `RoutingContext.begin_forward`).
CONTINUATION_WARNING = (
    "This forward adds several tokens to a KV cache that already holds some (a reused prompt cache or chunked "
    "prefill). SpaRTA routes it by the whole sequence, cached tokens and new ones, as one forward of the whole "
    "sequence would; the cached tokens' keys and values, though, were computed under the routing of the tokens "
    "cached at that time. For outputs equal to one forward of the whole prompt, reuse a cached prefix only among "
    "prompts of one task (or force the task with model.set_task)."
)

#: Label of the positions that carry no target (PyTorch's cross-entropy default, used by transformers and TRL).
IGNORE_INDEX = -100


@dataclass
class ForwardRouting:
    """The routing inputs of one model forward, computed once by the model's pre-hook, and what its layers report.

    sequence_query: (batch, dim) masked mean of the input embeddings, for sequence routing.
    token_mask: (batch, seq) bool, positions whose queries build the router state in training (the prompt part).
    valid_mask: (batch, seq) bool, the positions the attention mask keeps (all when none is given).
    sequence_sums: per component router, its per-sequence sums (batch, 2) over this forward's tokens and the cached
        ones before them, kept with the KV cache for the next decode step (see `ComponentRouter`).
    cached_sums: the same sums read from the KV cache that a decode step continues.
    sequence_gates: per router state and settings, the inference gates of this forward under sequence routing,
        computed by the first layer that routes and read by the others (see `Router.decide`).
    sequence_routings: the same for the branches those gates select (see `Router.route`); both are kept with the KV
        cache and reused by its decode steps.
    regularization: the weighted regularizers of this forward, summed over layers (detached, for logging).
    embedding_sums: under sequence routing, the sum (batch, dim) of the embeddings of the sequence's tokens (this
        forward's and the cached ones) and their number (batch, 1), kept with the KV cache for the next forward.
    """

    sequence_query: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    valid_mask: Optional[torch.Tensor] = None
    sequence_sums: dict = field(default_factory=dict)
    cached_sums: dict = field(default_factory=dict)
    sequence_gates: dict = field(default_factory=dict)
    sequence_routings: dict = field(default_factory=dict)
    regularization: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding_sums: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def _forward_field(name: str) -> property:
    """A `ForwardRouting` field read and written through the context: the calling thread's forward."""
    return property(
        lambda context: getattr(context.forward, name),
        lambda context, value: setattr(context.forward, name, value),
        doc=f"``{name}`` of the calling thread's forward (see `ForwardRouting`).",
    )


class RoutingContext:
    """What the SpaRTA layers of one model share: the routing inputs of each forward (`ForwardRouting`) and, across
    forwards, ``penalty_scale``, the weight of the regularizers' gradient in each backward (see
    `peft_sparta.regularizers`).

    Each thread has its own forward, so that threads running inference on one model (a web server's usual shape)
    never route by each other's inputs. A thread that began no forward (the autograd engine's device threads, which
    recompute checkpointed layers in a backward pass) reads the latest forward begun in any thread.
    """

    sequence_query = _forward_field("sequence_query")
    token_mask = _forward_field("token_mask")
    valid_mask = _forward_field("valid_mask")
    sequence_sums = _forward_field("sequence_sums")
    cached_sums = _forward_field("cached_sums")
    sequence_gates = _forward_field("sequence_gates")
    sequence_routings = _forward_field("sequence_routings")
    regularization = _forward_field("regularization")

    def __init__(self, penalty_scale: float = 1.0, **forward) -> None:
        self.penalty_scale = penalty_scale
        self._threads = threading.local()
        self._start(ForwardRouting(**forward))

    def _start(self, forward: ForwardRouting) -> None:
        self._threads.forward = self._latest = forward

    @property
    def forward(self) -> ForwardRouting:
        """The calling thread's forward, or the latest one begun in any thread when this thread began none."""
        return getattr(self._threads, "forward", self._latest)

    def __getstate__(self) -> dict:
        """Copies and pickles of a model keep the regularizers' weight; the routing of a forward is no state."""
        return {"penalty_scale": self.penalty_scale}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def report(self, values: dict[str, torch.Tensor]) -> None:
        """Add one layer's regularizer values to this forward's totals."""
        totals = self.regularization
        for name, value in values.items():
            total = totals.get(name)
            totals[name] = value.detach() if total is None else total + value.detach()

    def begin_forward(self, args: tuple, kwargs: dict, embeddings: Optional[nn.Embedding], sequence: bool) -> None:
        """Start the calling thread's forward from a model call's arguments; ``sequence``: whether any layer routes
        per sequence.

        The sequence query is the mean of the embeddings of the whole sequence: a forward that extends a KV cache by
        several tokens (a reused prompt cache, chunked prefill) adds them to the cached tokens' sum, kept with the
        cache, so that it routes as one forward of the whole sequence would. A decode step (one new token) keeps the
        query its cache holds, decided at prefill, and the gates and branches chosen for it (so interleaved
        conversations, each with its cache, keep their own routing, and a decode step neither scores nor reads
        gates), and adds its token to the sum; a decode step whose cache holds no query is routed from its own
        token. It also reads the component routers' sums over the cached tokens, to which it adds its own.
        """
        forward = ForwardRouting()
        self._start(forward)
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None or tokens.dim() < 2:
            return
        batch, length = tokens.shape[:2]
        cache = kv_cache(kwargs) if extends_cached_sequence(kwargs, length) else None
        forward.cached_sums = dict(getattr(cache, CACHED_SUMS, {}))
        forward.valid_mask = valid_positions(kwargs.get("attention_mask"), tokens)
        forward.token_mask = prompt_mask(forward.valid_mask, kwargs.get("labels"))
        if not sequence:
            return
        with torch.no_grad():
            embedded = inputs_embeds if inputs_embeds is not None else embeddings(input_ids)
            total, count = masked_sum(embedded, forward.token_mask)
            cached_total, cached_count = getattr(cache, CACHED_EMBEDDING_SUMS, (None, None))
            if cached_total is not None and cached_total.shape == total.shape:
                total, count = (
                    cached_total + total.to(cached_total.device),
                    cached_count + count.to(cached_count.device),
                )
        forward.embedding_sums = (total, count)
        cached_query = getattr(cache, CACHED_QUERY, None)
        if length == 1 and cached_query is not None and cached_query.shape[0] == batch:
            forward.sequence_query = cached_query
            gates, routings = getattr(cache, CACHED_DECISIONS, ({}, {}))
            forward.sequence_gates, forward.sequence_routings = dict(gates), dict(routings)
            return
        if cache is not None and length > 1:
            warnings.warn(CONTINUATION_WARNING, stacklevel=2)
        forward.sequence_query = total / count.clamp(min=1.0)


def valid_positions(attention_mask: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the positions of the new tokens that the attention mask keeps (its last seq columns, as a
    mask also covers the cached tokens); every position when no mask of that batch size is given."""
    batch, length = tokens.shape[:2]
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and attention_mask.shape[0] == batch:
        if attention_mask.shape[1] >= length:
            return attention_mask[:, -length:].bool()
    return torch.ones(batch, length, dtype=torch.bool, device=tokens.device)


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
