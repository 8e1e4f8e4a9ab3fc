"""SpaRTA's routing decision outside the model, for serving exported tasks (`peft_sparta.export`) with a LoRA engine:
`TaskRouter` reads a saved adapter's router state and config, and picks each request's task from its prompt."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import current_key, split_pooled_query_spread
from ..config import QUERY_SCATTER_FORMAT_VERSION, SpaRTAConfig
from ..errors import SpaRTALoadError
from ..routers import Router, RoutingContext, make_router, prompt_mask
from ..utils import masked_mean
from . import check_exportable_config, check_routing


ROUTER_KEY = ".sparta_router."


class TaskRouter:
    """The task SpaRTA routes each input to, or None where it abstains, from the input's token ids alone.

    It holds the router state of a saved adapter (prototypes or keys, no branch weights) and the base model's input
    embeddings, and decides with SpaRTA's own router under the adapter's settings (metric, per-task floors,
    thresholds): the query is the mean of the input embeddings over the attention mask, as SpaRTA's sequence routing
    computes it for a prompt without labels. Serve the task's exported LoRA (`SpaRTAModel.export_lora`) for the input,
    and the shared-only LoRA where it returns None: the output is SpaRTA's with ``top_k=1``. Pass the token ids the
    model gets (after the chat template), since the query is their mean embedding.

    Example:

        ```py
        >>> router = TaskRouter.from_pretrained("sparta-adapter", embeddings=base_model.get_input_embeddings())
        >>> router.route(input_ids, attention_mask)  # e.g. ["summarize", None]
        ```
    """

    def __init__(self, config: SpaRTAConfig, router: Router, embeddings: nn.Module) -> None:
        self.config = config
        self.router = router.eval()
        self.embeddings = embeddings

    @property
    def task_names(self) -> list[str]:
        return list(self.config.task_names)

    @classmethod
    def from_pretrained(
        cls, sparta_adapter_dir: str, embeddings: nn.Module, subfolder: Optional[str] = None
    ) -> TaskRouter:
        """The router of the SpaRTA adapter saved in ``sparta_adapter_dir`` (a folder or a Hub id), with the base
        model's input embeddings ``embeddings`` (``base_model.get_input_embeddings()``). Refuses what the exported
        LoRAs cannot serve (see `peft_sparta.export.export_lora`)."""
        config = SpaRTAConfig.from_pretrained(sparta_adapter_dir, subfolder=subfolder)
        if not isinstance(config, SpaRTAConfig):
            raise ValueError(f"{sparta_adapter_dir!r} holds a {config.peft_type} adapter, not a SpaRTA adapter.")
        check_exportable_config(config)
        weight = getattr(embeddings, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(
                f"embeddings must be the base model's input embeddings (an nn.Embedding, from "
                f"base_model.get_input_embeddings()), got {type(embeddings).__name__}."
            )
        granularity = "token" if config.router_granularity == "token" or config.router == "spectral" else "sequence"
        router = make_router(config, granularity, weight.shape[1])
        for _ in config.task_names:
            router.add_task()
        check_routing(config, router)
        if not router._is_constant(len(config.task_names)):
            _load_router_state(router, _weights_file(sparta_adapter_dir, subfolder), config)
        if config.top_k != 1 and len(config.task_names) > 1:
            warnings.warn(
                f"The adapter has top_k={config.top_k}: SpaRTA mixes the task branches an input's gates select, "
                "while one LoRA per request serves the input's best task alone; served this way, the outputs are "
                "SpaRTA's with top_k=1.",
                stacklevel=2,
            )
        return cls(config, router, embeddings)

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[Optional[str]]:
        """Per row of ``input_ids`` (batch, length), the name of the task SpaRTA routes it to, or None where it
        abstains (the input gets the shared branch alone)."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a tensor (batch, length) of token ids, as the model takes them.")
        valid = torch.ones(input_ids.shape, dtype=torch.bool)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; "
                    "they must match."
                )
            valid = attention_mask.bool()
        device = self.embeddings.weight.device
        embedded = self.embeddings(input_ids.to(device))
        query = masked_mean(embedded, prompt_mask(valid.to(device), None)).cpu()
        context = RoutingContext(sequence_query=query)
        gates = self.router.decide(query, context, [(None, None)] * len(self.config.task_names))
        gates = gates.reshape(query.shape[0], -1)
        names = self.config.task_names
        best = gates.argmax(dim=-1).tolist()
        return [names[task] if routed else None for task, routed in zip(best, (gates.amax(dim=-1) > 0).tolist())]

    def route_texts(self, texts: Sequence[str], tokenizer) -> list[Optional[str]]:
        """`route` for texts, tokenized one by one with ``tokenizer`` as the model gets them (special tokens
        included; apply the chat template first where the model gets one)."""
        encoded = [tokenizer(text)["input_ids"] for text in texts]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.zeros(len(encoded), length, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), length, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return self.route(input_ids, attention_mask)


def _weights_file(model_id: str, subfolder: Optional[str]) -> str:
    folder = os.path.join(str(model_id), subfolder or "")
    if os.path.isdir(folder):
        path = os.path.join(folder, "adapter_model.safetensors")
        if not os.path.exists(path):
            raise SpaRTALoadError(f"{folder!r} holds no adapter_model.safetensors: save the adapter with safetensors.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(str(model_id), "adapter_model.safetensors", subfolder=subfolder)


def _load_router_state(router: Router, path: str, config: SpaRTAConfig) -> None:
    """Load the router state of the saved adapter into ``router``: the state of one adapted layer (format versions
    1-2 kept the same copy in every layer), under today's names; adapters saved before the query spread was kept
    load without it, as they do into a model."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as weights:
        keys = sorted(key for key in weights.keys() if ROUTER_KEY in current_key(key))
        owner = current_key(keys[0]).split(ROUTER_KEY)[0] if keys else None
        for key in keys:
            layer, name = current_key(key).split(ROUTER_KEY)
            if layer == owner:
                state[name] = weights.get_tensor(key)
    state = split_pooled_query_spread(state, config)
    expected = router.state_dict()
    missing = set(expected) - set(state)
    if config.format_version < QUERY_SCATTER_FORMAT_VERSION:
        missing -= {"query_scatter", "query_count"}
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise SpaRTALoadError(
            f"The router state in {path!r} does not match its config (missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}): adapter_config.json and the weights come from different saves."
        )
    mismatched = [name for name, value in state.items() if tuple(value.shape) != tuple(expected[name].shape)]
    if mismatched:
        raise SpaRTALoadError(
            f"The router state in {path!r} has other shapes than its config and the embeddings give ({mismatched}): "
            "pass the input embeddings of the base model the adapter was trained on."
        )
    router.load_state_dict(state, strict=False)
