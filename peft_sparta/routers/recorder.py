"""The routing recorder: which task branches the router picks for each input of a SpaRTA model's forwards."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import masked_mean
from .base import routed_layers


if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RoutingRecorder"]


class RoutingRecorder:
    """Records, for every forward of a SpaRTA model, each input's gates over the task branches.

    Forward pre-hooks on the SpaRTA layers compute `SpaRTALayer.router_gates` from the layer input; per input the gates
    are averaged over its positions (the prompt mask of the routing context: valid tokens, or prompt tokens when labels
    are passed) and over the adapted layers. With sequence routing every layer gives the same gates.

        with RoutingRecorder(model) as recorder:
            model(**batch)
        recorder.take()  # (batch, tasks)

    The context manager calls `start` (register the hooks) and `stop` (remove them); call them yourself to record
    across callbacks, as `SpaRTACallback` does.

    ``training``: record only forwards in training mode (True; the gates the router would give at inference) or in
    eval mode (False); None records both. ``quantity="scores"`` records each task's router score (best cosine
    similarity, `SpaRTALayer.router_scores`) instead of the gates: the scores of your tasks' inputs and of text that
    should abstain show where to put ``router_abstain_threshold``.
    """

    def __init__(
        self, model, adapter_name: str | None = None, training: bool | None = None, quantity: str = "gates"
    ) -> None:
        if quantity not in ("gates", "scores"):
            raise ValueError(f"quantity must be 'gates' or 'scores', got {quantity!r}.")
        self.quantity = quantity
        self.model = model
        self.layers = routed_layers(model)
        if not self.layers:
            raise ValueError("RoutingRecorder needs a model with SpaRTA layers.")
        self.adapter_name = adapter_name
        self.training = training
        self.enabled = True
        self._handles: list = []
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._tasks: tuple[str, ...] | None = None
        self._records: list[tuple[torch.Tensor, tuple[str, ...] | None]] = []

    def start(self) -> None:
        """Register the hooks: from now on every forward of the model is recorded (while ``enabled``)."""
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._hook))
        self._register_model_hook()

    def stop(self) -> None:
        """Remove the hooks. What was recorded stays available to `take`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _register_model_hook(self) -> None:
        # one record per model forward: the layers accumulate, the forward hook of the wrapped model closes the record
        base_model = getattr(self.model, "base_model", None)
        root = getattr(base_model, "model", None)
        root = root if isinstance(root, nn.Module) else self.model
        self._handles.append(root.register_forward_hook(self._close, always_call=True))

    def _adapter(self, layer) -> str | None:
        names = [self.adapter_name] if self.adapter_name is not None else list(layer.active_adapters)
        names = [name for name in names if name in layer.sparta_A_task]
        return names[0] if names else None

    @torch.no_grad()
    def _hook(self, layer, args) -> None:
        if not self.enabled or not args or not torch.is_tensor(args[0]):
            return
        if self.training is not None and layer.training != self.training:
            return
        adapter_name = self._adapter(layer)
        if adapter_name is None or layer.disable_adapters:
            return
        x = args[0]
        read = layer.router_gates if self.quantity == "gates" else layer.router_scores
        per_input = self._reduce(layer, read(adapter_name, x).float(), x)
        if self._sum is not None and self._sum.shape != per_input.shape:
            return  # a layer whose input is not laid out (batch, ..., features) like the others
        self._sum = per_input if self._sum is None else self._sum + per_input
        self._count += 1
        if layer.sparta_variant[adapter_name].gates_per_task:
            self._tasks = tuple(layer.sparta_settings[adapter_name].task_names)

    @staticmethod
    def _reduce(layer, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if values.dim() == 1:
            return values.unsqueeze(0)
        flat = values.reshape(values.shape[0], -1, values.shape[-1])
        context = layer.routing_context
        mask = context.token_mask if context is not None else None
        if flat.shape[1] <= 1 or mask is None or tuple(mask.shape) != tuple(flat.shape[:2]):
            mask = None  # every position counts
        return masked_mean(flat, mask)

    def _close(self, *args) -> None:
        if self._sum is not None and self._count:
            self._records.append(((self._sum / self._count).cpu(), self._tasks))
        self._sum, self._count, self._tasks = None, 0, None

    def take(self) -> torch.Tensor:
        """Gates or scores (inputs, tasks) of every input recorded since the last call, in forward order. Tasks
        added while recording get a zero column in the records before them; a task removed while recording would
        shift the columns of the later records, so `take` then raises (and keeps the records)."""
        self._close()
        if not self._records:
            return torch.zeros(0, 0)
        known = [tasks for _, tasks in self._records if tasks is not None]
        longest = max(known, key=len, default=())
        changed = [tasks for tasks in known if tasks != longest[: len(tasks)]]
        if changed:
            raise ValueError(
                f"The adapter's tasks changed while recording other than by add_task (records under {list(changed[0])} "
                f"and under {list(longest)}): remove_task shifts the columns, so they would mix tasks. Call take() "
                "before remove_task; these records are kept."
            )
        records, self._records = self._records, []
        width = max(record.shape[-1] for record, _ in records)
        return torch.cat([F.pad(record, (0, width - record.shape[-1])) for record, _ in records])
