"""``LoomModule``: a ``torch.nn.Module`` that also says how to train, evaluate and predict with it.

How it reaches the Trainer (attached with ``_attach`` while a run lasts, never pickled):

- ``self.log`` -> ``trainer._metrics.log`` (the ``MetricStore``; it knows the running hook);
- ``manual_backward(loss)`` -> the ``on_before_backward`` hooks (``trainer._call_callbacks`` then
  ``trainer._call_module``), ``trainer._adapter.backward(loss, ...)``, the ``on_after_backward`` hooks:
  the order automatic optimization uses;
- ``LoomOptimizer.step`` -> ``trainer._adapter.optimizer_step(optimizer, closure=...)``, which runs
  the closure, then the trainer's before-step work (``on_before_optimizer_step``), then the step;
- ``clip_gradients`` -> ``trainer._adapter.clip_gradients(optimizer, clip_val=..., algorithm=...)``;
- ``all_gather`` and ``transfer_batch_to_device`` -> the core strategy (``trainer.strategy``).

``training_step`` / ``validation_step`` / ``test_step`` exist on the base and raise a clear error;
use ``is_overridden(module, name)`` to ask whether a subclass defines one. The ``*_dataloader`` hooks
are not defined on the base at all (look them up with ``getattr``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import Self

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_only
from torchloom.trainer.hparams import HyperparametersMixin
from torchloom.trainer.optimizers import LoomOptimizer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from torchloom.trainer.trainer import Trainer

__all__ = ["NO_OP_HOOKS", "LoomModule", "is_overridden"]

CLIP_ALGORITHMS = ("norm", "value")
_NOT_PICKLED = ("_trainer", "_loom_optimizers", "_toggled")


def is_overridden(obj: object, name: str, base: type | None = None) -> bool:
    """Whether ``type(obj)`` defines ``name`` differently from ``base`` (default: ``LoomModule``)."""
    base = base or LoomModule
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def _unwrap(optimizer: Optimizer | LoomOptimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LoomOptimizer) else optimizer


def _params(optimizer: Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class LoomModule(HyperparametersMixin, nn.Module):
    """Base class of models the Trainer fits. Override ``training_step`` and ``configure_optimizers``."""

    automatic_optimization: bool = True
    _trainer: Trainer | None = None
    _toggled: tuple[Optimizer, list[tuple[Tensor, bool]]] | None = None

    # ------------------------------------------------------------------ the trainer
    @property
    def trainer(self) -> Trainer:
        """The Trainer running this module (set while fit/validate/test/predict run)."""
        if self._trainer is None:
            raise ConfigurationError(
                f"{type(self).__name__} is not attached to a Trainer: this needs a running trainer.fit/validate/test/predict."
            )
        return self._trainer

    def _attach(self, trainer: Trainer) -> None:
        self.__dict__["_trainer"] = trainer

    def _detach(self) -> None:
        for name in _NOT_PICKLED:
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in _NOT_PICKLED:
            state.pop(name, None)
        return state

    @property
    def device(self) -> torch.device:
        """The trainer's device while attached, else the device of the first parameter (or the CPU)."""
        if self._trainer is not None:
            device: torch.device = self._trainer.strategy.root_device
            return device
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def device_mesh(self) -> DeviceMesh | None:
        """The strategy's ``DeviceMesh`` (sharded strategies; set up before ``configure_model`` runs), else ``None``.

        With ``ModelParallelStrategy()`` ``configure_model`` parallelizes the layers over it, e.g.
        ``parallelize_module(self.mlp, self.device_mesh["tensor_parallel"], plan)``.
        """
        if self._trainer is None:
            return None
        mesh: DeviceMesh | None = getattr(self._trainer.strategy, "device_mesh", None)
        return mesh

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def logger(self) -> Any:
        """The trainer's first logger, or ``None``."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list[Any]:
        return list(self._trainer.loggers) if self._trainer is not None else []

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self._trainer is not None:
            if self._trainer.is_global_zero:
                print(*args, **kwargs)
        else:
            rank_zero_only(print)(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        sync_dist: bool = False,
        batch_size: int | None = None,
    ) -> None:
        """Records ``value`` (a number or one-element tensor) under ``name``; see ``torchloom.trainer.logging``."""
        if self._trainer is None:
            raise ConfigurationError(
                f"self.log({name!r}, ...) needs a running Trainer; {type(self).__name__} is not attached to one."
            )
        self._trainer._metrics.log(
            name,
            value,
            prog_bar=prog_bar,
            logger=logger,
            on_step=on_step,
            on_epoch=on_epoch,
            reduce_fx=reduce_fx,
            sync_dist=sync_dist,
            batch_size=batch_size,
        )

    def log_dict(self, metrics: Mapping[str, Any], **kwargs: Any) -> None:
        """``self.log(name, value, **kwargs)`` for every item of ``metrics``."""
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    # ------------------------------------------------------------------ optimization
    def optimizers(self, use_loom_optimizer: bool = True) -> Any:
        """The optimizer, or the list when there are several, as ``LoomOptimizer`` (or raw) objects."""
        items: list[Any] = self._wrapped_optimizers() if use_loom_optimizer else list(self.trainer.optimizers)
        return items[0] if len(items) == 1 else items

    def _wrapped_optimizers(self) -> list[LoomOptimizer]:
        """The trainer's optimizers as ``LoomOptimizer``\\ s, the same objects for as long as the optimizers are."""
        raw = list(self.trainer.optimizers)
        cached: list[LoomOptimizer] | None = self.__dict__.get("_loom_optimizers")
        if cached is None or len(cached) != len(raw) or any(w.optimizer is not o for w, o in zip(cached, raw)):
            cached = [LoomOptimizer(o, self) for o in raw]
            self.__dict__["_loom_optimizers"] = cached
        return cached

    def lr_schedulers(self) -> Any:
        """The scheduler, the list when there are several, or ``None``."""
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward through the strategy and precision (and the backward hooks); manual optimization only."""
        if self.automatic_optimization:
            raise ConfigurationError(
                "manual_backward() is for manual optimization: set self.automatic_optimization = False in "
                "__init__. In automatic optimization the Trainer calls backward on what training_step returns."
            )
        trainer = self.trainer
        trainer._call_callbacks("on_before_backward", loss)
        trainer._call_module("on_before_backward", loss)
        trainer._adapter.backward(loss, *args, **kwargs)
        trainer._call_callbacks("on_after_backward")
        trainer._call_module("on_after_backward")

    def toggle_optimizer(self, optimizer: Optimizer | LoomOptimizer) -> None:
        """Turns off ``requires_grad`` of every parameter ``optimizer`` does not own, until ``untoggle_optimizer``."""
        optimizer = _unwrap(optimizer)
        if self._toggled is not None:
            self.untoggle_optimizer(self._toggled[0])
        owned = {id(p) for p in _params(optimizer)}
        others = [p for o in (self._trainer.optimizers if self._trainer is not None else []) for p in _params(o)]
        changed: list[tuple[Tensor, bool]] = []
        seen: set[int] = set(owned)
        for param in [*self.parameters(), *others]:
            if id(param) not in seen:
                seen.add(id(param))
                changed.append((param, param.requires_grad))
                param.requires_grad = False
        self.__dict__["_toggled"] = (optimizer, changed)

    def untoggle_optimizer(self, optimizer: Optimizer | LoomOptimizer) -> None:
        """Restores the ``requires_grad`` flags ``toggle_optimizer(optimizer)`` changed."""
        optimizer = _unwrap(optimizer)
        if self._toggled is None:
            return
        toggled, changed = self._toggled
        if toggled is not optimizer:
            raise ConfigurationError(
                f"untoggle_optimizer() got {type(optimizer).__name__} at {id(optimizer):#x}, but the toggled "
                f"optimizer is {type(toggled).__name__} at {id(toggled):#x}."
            )
        for param, requires_grad in changed:
            param.requires_grad = requires_grad
        self.__dict__.pop("_toggled")

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer: Optimizer | LoomOptimizer) -> Generator[None, None, None]:
        """``toggle_optimizer`` for the duration of a ``with`` block."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def clip_gradients(
        self,
        optimizer: Optimizer | LoomOptimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> Tensor | None:
        """Clips the gradients of ``optimizer``'s parameters by total norm (default) or by value; 0/None: no-op.

        Returns the total norm before clipping (by norm; over every shard under sharded strategies), else ``None``.
        """
        algorithm = "norm" if gradient_clip_algorithm is None else gradient_clip_algorithm
        if algorithm not in CLIP_ALGORITHMS:
            raise ConfigurationError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not valid. Valid: {choices(CLIP_ALGORITHMS)}."
            )
        if gradient_clip_val is None:
            return None
        if (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, (int, float))
            or gradient_clip_val < 0
        ):
            raise ConfigurationError(f"gradient_clip_val={gradient_clip_val!r} is not valid: use a number >= 0.")
        if gradient_clip_val == 0:
            return None
        return self.trainer._adapter.clip_gradients(
            _unwrap(optimizer), clip_val=float(gradient_clip_val), algorithm=algorithm
        )

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Called before each optimizer step with the Trainer's clipping settings; override to clip differently."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Optimizer | LoomOptimizer, optimizer_closure: Any = None
    ) -> None:
        """Steps ``optimizer``; the closure runs ``training_step`` and backward (automatic optimization)."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer | LoomOptimizer) -> None:
        optimizer.zero_grad()

    def lr_scheduler_step(self, scheduler: Any, metric: Tensor | None) -> None:
        """Steps ``scheduler``; ``metric`` is the monitored value for schedulers that take one."""
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def all_gather(self, data: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        """Every rank's ``data`` (tensors in any nesting), stacked along a new first dimension."""
        return self.trainer.strategy.all_gather(data, group=group, sync_grads=sync_grads)

    def freeze(self) -> None:
        """No gradients for any parameter, and evaluation mode."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    # ------------------------------------------------------------------ what the user writes
    def configure_optimizers(self) -> Any:
        """The optimizers and schedulers to train with; see ``torchloom.trainer.optimizers`` for the forms."""
        raise ConfigurationError(
            f"{type(self).__name__} defines no configure_optimizers(); the Trainer needs it to fit. Return an "
            "optimizer, e.g. torch.optim.Adam(self.parameters(), lr=1e-3)."
        )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Returns the loss (a tensor, or a mapping with ``"loss"``), or ``None`` to skip the batch."""
        raise ConfigurationError(f"{type(self).__name__} defines no training_step(batch, batch_idx); fit needs it.")

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(
            f"{type(self).__name__} defines no validation_step(batch, batch_idx); validation needs it."
        )

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(f"{type(self).__name__} defines no test_step(batch, batch_idx); test needs it.")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """By default the model's output for the batch: ``self(batch)``."""
        return self(batch)

    def configure_model(self) -> None:
        """Builds layers late, inside the strategy's init context (for sharded strategies)."""

    def configure_callbacks(self) -> list[Any]:
        """Callbacks this model needs; they are added to (and replace same-type ones of) the Trainer's."""
        return []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.trainer.strategy.batch_to_device(batch, device)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike[str],
        map_location: Any = None,
        strict: bool = True,
        **overrides: Any,
    ) -> Self:
        """A module built from the checkpoint's hyper-parameters (``overrides`` replace some) and weights."""
        from torchloom.trainer.checkpoint import load_module_from_checkpoint

        module = load_module_from_checkpoint(
            cls, checkpoint_path, map_location=map_location, strict=strict, **overrides
        )
        if not isinstance(module, cls):
            raise TypeError(f"The checkpoint loaded into {type(module).__name__}, not {cls.__name__}.")
        return module

    # ------------------------------------------------------------------ hooks (no-ops; the order is in docs/trainer/hooks.md)
    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Returning -1 skips the rest of the epoch."""
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_before_backward(self, loss: Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer: Optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...


# The base's hooks that do nothing: the Trainer does not even call them unless a subclass overrides them.
NO_OP_HOOKS = frozenset(
    name
    for name in vars(LoomModule)
    if name.startswith("on_") or name in ("prepare_data", "setup", "teardown", "configure_model")
)
