"""Trainer integration: the regularizers' weight per optimizer step, and SpaRTA's values in the Trainer logs.

SpaRTA needs no Trainer subclass: in training mode every adapted layer attaches its regularizers to its output (see
`peft_sparta.regularizers`), so the Trainer, TRL's trainers and custom losses all train them. `import peft_sparta`
makes every `transformers.Trainer` (TRL's included) that trains a SpaRTA model add a `SpaRTACallback`, which

- sets the regularizers' gradient weight at every optimizer step to 1 / (micro-batches in the step), times the
  fp16 loss scale when mixed precision scales the loss, so that ``orth_lambda`` means the same whatever the
  batch size, gradient accumulation or number of processes;
- logs the regularizers next to the Trainer's ``loss``, which is the task loss alone.

Created by hand (``callbacks=[SpaRTACallback()]`` or `SpaRTACallback.attach(trainer)`), it also logs the router:

    from peft_sparta.trainer import SpaRTACallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SpaRTACallback()])

Every training log then carries

- ``sparta/orthogonality`` and ``sparta/router``: the weighted regularizers (``model.base_model.last_regularization``),
  averaged over the forwards (micro-batches) since the previous log;
- ``sparta/gate/<task>``: the mean gate the router would give each task branch on the training inputs since the
  previous log (in training the current task is routed to its own branch; this is the router's decision at
  inference), and ``sparta/routed_to_current``: the fraction of those inputs whose top gate is the current task;
  with ``task_branches="shared"``, ``sparta/weight/shared`` and ``sparta/weight/task``: the mean router weights of
  the two branches;

and every evaluation log ``eval_sparta/gate/<task>`` (the gates actually used in eval mode). The values are written
into the ``logs`` dict of ``on_log`` and into the same record of ``state.log_history``. Callbacks run in list order
and the reporting integrations (TensorBoard, W&B, ...) come before user callbacks; `SpaRTACallback.attach(trainer)`
puts the callback first so that they report these values too.
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers import TrainerCallback

from .model import find_sparta_tuner
from .routers.recorder import RoutingRecorder
from .variants import task_branch_variant


__all__ = ["SpaRTACallback"]


class SpaRTACallback(TrainerCallback):
    """Adds SpaRTA's regularizer values and per-task router weights to the Trainer logs (see the module docstring).

    Args:
        prefix (`str`, defaults to `"sparta/"`): prefix of the logged keys.
        routing (`bool`, defaults to `True`): record router gates (one extra score computation per adapted layer and
            forward, small next to the layer itself); False logs the regularizers only.
        trainer (`Trainer`, *optional*): the trainer, set by `attach` and by the automatic registration; it gives
            the micro-batches of each step and the fp16 loss scale (without it, ``gradient_accumulation_steps``).
    """

    def __init__(self, prefix: str = "sparta/", routing: bool = True, trainer=None) -> None:
        self.prefix = prefix
        self.routing = routing
        self.trainer = trainer
        self._tuner = None
        self._train_recorder: RoutingRecorder | None = None
        self._eval_recorder: RoutingRecorder | None = None
        self._sums: dict[str, float] = {}
        self._count = 0

    @classmethod
    def attach(cls, trainer, **kwargs) -> SpaRTACallback:
        """Create the callback and put it first among ``trainer``'s callbacks, before the reporting integrations, in
        place of any SpaRTACallback the trainer had."""
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [callback for callback in callbacks if not isinstance(callback, SpaRTACallback)]
        callback = cls(trainer=trainer, **kwargs)
        callbacks.insert(0, callback)
        return callback

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def _ensure(self, model) -> None:
        if self._tuner is not None or model is None:
            return
        self._tuner = find_sparta_tuner(model)
        if self._tuner is None or not self.routing:
            return
        peft_model = (
            model.module if hasattr(model, "module") and find_sparta_tuner(model.module) is not None else model
        )
        self._train_recorder = RoutingRecorder(peft_model, training=True)
        self._eval_recorder = RoutingRecorder(peft_model, training=False)
        self._train_recorder.start()
        self._eval_recorder.start()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._ensure(model)
        restoring = self._tuner is not None and any(
            getattr(config, "restore_every", None) is not None for config in self._tuner.peft_config.values()
        )
        if restoring and getattr(self.trainer, "is_deepspeed_enabled", False):
            warnings.warn(
                "Stochastic restoration (restore_every) runs after optimizer steps that update the adapter's own "
                "parameters; DeepSpeed's optimizer holds copies of them, so no restoration happens. Call "
                "model.restore_stochastically() every restore_every steps from a callback of your own.",
                stacklevel=2,
            )

    def on_train_end(self, args, state, control, **kwargs):
        for recorder in (self._train_recorder, self._eval_recorder):
            if recorder is not None:
                recorder.stop()
        self._train_recorder = self._eval_recorder = None
        self._tuner = None

    # ---- regularizers -----------------------------------------------------------------------------------------------

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._ensure(model)
        if self._tuner is not None:
            self._tuner.penalty_scale = self._penalty_scale(args)

    def _penalty_scale(self, args) -> float:
        """1 / (micro-batches of this optimizer step) times the fp16 loss scale, as the Trainer scales its loss."""
        micro_batches = getattr(self.trainer, "current_gradient_accumulation_steps", None)
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return loss_scale / (micro_batches or args.gradient_accumulation_steps)

    def _collect(self) -> None:
        values = getattr(self._tuner, "last_regularization", None) if self._tuner is not None else None
        if not values:
            return
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(torch.as_tensor(value).float())
        self._count += 1
        # consumed: a later micro-batch that computes no loss must not count this value twice
        self._tuner.last_regularization = {}

    def on_substep_end(self, args, state, control, **kwargs):
        self._collect()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._ensure(model)
        self._collect()

    # ---- logging -------------------------------------------------------------------------------------------------

    def _task_names(self) -> list[str]:
        return list(self._tuner.task_names) if self._tuner is not None else []

    def _gate_logs(self, recorder: RoutingRecorder | None, prefix: str, with_current: bool) -> dict[str, float]:
        if recorder is None:
            return {}
        gates = recorder.take()
        names = self._task_names()
        if gates.numel() == 0 or not names:
            return {}
        config = self._tuner.peft_config.get(self._tuner.active_adapters[0])
        return task_branch_variant(config).gate_logs(gates, names, prefix, with_current)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self._ensure(model)
        if logs is None or self._tuner is None:
            return
        added: dict[str, float] = {}
        if any(key.startswith("eval_") for key in logs):
            added.update(self._gate_logs(self._eval_recorder, f"eval_{self.prefix}", with_current=False))
        else:
            self._collect()
            if self._count:
                added.update({f"{self.prefix}{name}": total / self._count for name, total in self._sums.items()})
            self._sums, self._count = {}, 0
            added.update(self._gate_logs(self._train_recorder, self.prefix, with_current=True))
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def with_sparta_callback(original):
    """``Trainer.__init__`` that adds a `SpaRTACallback` when the trainer trains a SpaRTA model (`registration.install`
    puts it in place when the package is imported): the callback sets the regularizers' weight per optimizer step,
    which correct training needs."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if find_sparta_tuner(self.model) is None:
            return
        present = [callback for callback in self.callback_handler.callbacks if isinstance(callback, SpaRTACallback)]
        for callback in present:
            callback.trainer = self
        if not present:
            SpaRTACallback.attach(self, routing=False)

    return __init__
