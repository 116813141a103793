"""DeepSpeedStrategy (``"deepspeed"``, ``"deepspeed_stage_{1,2,2_offload,3,3_offload}"``): ZeRO through DeepSpeed's engine.

ZeRO partitions the optimizer state (stage 1), also the gradients (stage 2), also the parameters
(stage 3) over the ranks; offload keeps the optimizer state (and, in stage 3, the parameters) in CPU
memory. ``setup_module_and_optimizers`` hands the module and the user's torch optimizer to
``deepspeed.initialize`` once; backward and step then go through the engine:

- ``backward(loss)`` is ``engine.backward(loss)``: the engine scales a float16 loss and, from stage 2,
  reduces gradients into their partitions as they are produced;
- ``optimizer_step(optimizer)`` is ``engine.step()``. The product owns the accumulation window as with
  DDP: backward calls inside ``no_backward_sync`` tell the engine they are not a window's end
  (``set_gradient_accumulation_boundary(False)``), so DeepSpeed accumulates in its own buffers and
  reduces on the window's last backward; the loss is scaled by the product, not again by the engine;
- gradient clipping is DeepSpeed's (``gradient_clipping``, applied inside the step, by norm);
- collectives run on the process group torchloom created, which DeepSpeed adopts.

The config is generated from the arguments; ``config`` (a dict or a JSON file) is merged over it, key by
key, and wins. Products tell the strategy their loop's batch size, accumulation and clipping through
``configure_loop`` before the engine is built. See ``deepspeed_config`` for what DeepSpeed compiles.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint import deepspeed as ds_io
from torchloom.core.checkpoint.checks import check_entries
from torchloom.core.checkpoint.distributed import remove_path, swap_into_place
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import CheckpointError, ConfigurationError
from torchloom.core.precision.deepspeed import DeepSpeedPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies import deepspeed_config as ds_config
from torchloom.core.strategies.checks import check_flag, check_wiring
from torchloom.core.strategies.parallel import DEFAULT_TIMEOUT, ParallelStrategy, check_start_method, launcher_for
from torchloom.core.strategies.strategy import StateFilter
from torchloom.core.utils.imports import require
from torchloom.core.watchdog import DEFAULT_STALL_TIMEOUT

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["DeepSpeedStrategy"]


class DeepSpeedStrategy(ParallelStrategy):
    """ZeRO data parallelism with DeepSpeed: one engine per model, one model per strategy.

    ``stage``: ZeRO stage 1, 2 or 3. ``offload_optimizer`` keeps optimizer state on the CPU;
    ``offload_parameters`` (stage 3) the parameters too. ``config``: a dict or JSON file merged over the
    generated config. ``zero_init`` (stage 3; default on): models built in ``init_module(empty_init=True)``
    / ``configure_model`` are partitioned as they are built (``deepspeed.zero.Init``), so no rank ever holds
    all of them. ``micro_batch_size``, ``gradient_accumulation_steps`` and ``gradient_clipping`` fill the
    config where the product does not (``configure_loop``). ``logging_level`` sets DeepSpeed's logger.
    """

    requires_joint_setup = True
    restore_checkpoint_after_setup = True  # the engine loads its checkpoint into itself
    supports_inference_mode = False  # stage 3 gathers parameters with in-place ops that inference tensors refuse

    def __init__(
        self,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        zero_init: bool | None = None,
        micro_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
        gradient_clipping: float = 0.0,
        logging_level: int = logging.WARNING,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        stall_timeout: datetime.timedelta | None = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        require("deepspeed", "DeepSpeedStrategy")  # before any process starts; names the extra to install
        check_wiring(accelerator, precision, checkpoint_io)  # before the precision is converted below
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=None if precision is None else DeepSpeedPrecision.from_precision(precision),
            process_group_backend=process_group_backend,
            timeout=timeout,
            stall_timeout=stall_timeout,
        )
        self._stage = ds_config.check_stage(stage)
        check_flag("offload_optimizer", offload_optimizer)
        check_flag("offload_parameters", offload_parameters)
        if zero_init is not None:
            check_flag("zero_init", zero_init)
        if offload_parameters and self._stage != 3:
            raise ConfigurationError(
                f"offload_parameters=True needs ZeRO stage 3 (parameters are partitioned only there), got stage="
                f"{stage}. Valid: stage=3, or offload_parameters=False."
            )
        if zero_init and self._stage != 3:
            raise ConfigurationError(f"zero_init=True needs ZeRO stage 3, got stage={stage}. Valid: stage=3.")
        self._offload_optimizer = bool(offload_optimizer)
        self._offload_parameters = bool(offload_parameters)
        self._user_config = ds_config.read_user_config(config)  # a bad path or bad JSON fails here, early
        self._zero_init = self._stage == 3 if zero_init is None else bool(zero_init)
        self._micro_batch_size = 1 if micro_batch_size is None else _positive_int("micro_batch_size", micro_batch_size)
        self._accumulation_steps = _positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        if (
            isinstance(gradient_clipping, bool)
            or not isinstance(gradient_clipping, (int, float))
            or not 0 <= gradient_clipping < math.inf  # NaN fails both comparisons
        ):
            raise ConfigurationError(
                f"gradient_clipping={gradient_clipping!r} is not valid. Valid: a finite number >= 0 (0: no clipping)."
            )
        self._gradient_clipping = float(gradient_clipping)
        if isinstance(logging_level, bool) or not isinstance(logging_level, int) or logging_level < 0:
            levels = "logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR (or another int >= 0)"
            raise ConfigurationError(f"logging_level={logging_level!r} is not valid. Valid: {levels}.")
        self._logging_level = logging_level
        self._start_method = check_start_method(start_method)
        self._engine: DeepSpeedEngine | None = None
        self._client_optimizer: Optimizer | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def stage(self) -> int:
        return self._stage

    @property
    def start_method(self) -> str:
        return self._start_method

    @property
    def config(self) -> dict[str, Any]:
        """The config the engine is (or will be) built with: generated, precision sections, then the user's."""
        generated = ds_config.generated_config(
            stage=self._stage,
            offload_optimizer=self._offload_optimizer,
            offload_parameters=self._offload_parameters,
            micro_batch_size=self._micro_batch_size,
            accumulation_steps=self._accumulation_steps,
            gradient_clipping=self._gradient_clipping,
        )
        precision = self.precision
        sections = precision.config if isinstance(precision, DeepSpeedPrecision) else {}
        config = ds_config.merge_configs(ds_config.merge_configs(generated, sections), self._user_config)
        if "train_batch_size" not in self._user_config:
            micro, steps = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
            config["train_batch_size"] = micro * steps * self.world_size
        elif "train_micro_batch_size_per_gpu" not in self._user_config:
            del config["train_micro_batch_size_per_gpu"]  # DeepSpeed derives it from the user's global batch size
        return config

    @property
    @override
    def initializes_empty_modules(self) -> bool:  # type: ignore[override]
        return self._zero_init  # zero.Init partitions the layers as they are built

    @property
    @override
    def clips_gradients_in_step(self) -> bool:  # type: ignore[override]
        if self._engine is not None:  # read every step: the engine's value, not a rebuilt config
            return float(self._engine.gradient_clipping() or 0.0) > 0
        return float(self.config.get("gradient_clipping", 0.0) or 0.0) > 0

    @override
    def configure_loop(
        self,
        *,
        micro_batch_size: int | None = None,
        accumulation_steps: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        """The product's batch size, accumulation window and clipping go into the config (before setup)."""
        if self._engine is not None:
            return  # already built (a later run of the same module): the engine keeps its config
        if micro_batch_size is not None:
            self._micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self._accumulation_steps = _positive_int("accumulation steps", accumulation_steps)
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm != "norm":
            raise ConfigurationError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported by DeepSpeed, which clips "
                "by total norm inside its step. Valid with DeepSpeed: 'norm'."
            )
        if self._gradient_clipping and self._gradient_clipping != gradient_clip_val:
            raise ConfigurationError(
                f"Gradient clipping is given twice: gradient_clip_val={gradient_clip_val!r} and DeepSpeedStrategy("
                f"gradient_clipping={self._gradient_clipping!r}). Choose one."
            )
        self._gradient_clipping = float(gradient_clip_val)

    @override
    def adapt_precision(self, precision: Precision) -> Precision:
        """The ``DeepSpeedPrecision`` for ``precision``; others, and fp16 on the CPU, are refused early."""
        return DeepSpeedPrecision.from_precision(precision)

    @override
    def configure_launcher(self) -> None:
        self._launcher = launcher_for(self, self._start_method)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup_environment(self) -> None:
        """Ranks, device and process group as for DDP; then DeepSpeed's communication backend adopts the group."""
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))  # deepspeed.initialize asserts it is set
        # DeepSpeed picks its device type once, on first use: the one torchloom was told, not the first it finds
        os.environ.setdefault("DS_ACCELERATOR", self.root_device.type)
        super().setup_environment()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(self._logging_level)
        with ds_config.without_cpu_shm_op(self.root_device.type == "cpu"):
            deepspeed.init_distributed(
                dist_backend=self.process_group_backend, dist_init_required=False, timeout=self.timeout
            )

    @override
    def teardown(self) -> None:
        engine, self._engine, self._client_optimizer = self._engine, None, None
        if engine is not None:
            engine.destroy()
        super().teardown()

    # ------------------------------------------------------------------ modules and optimizers
    @override
    @contextlib.contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """With ``zero_init`` and ``empty_init=True``: layers are partitioned over the ranks as they are built."""
        if not (empty_init and self._zero_init):
            with super().module_init_context(empty_init):
                yield
            return
        import deepspeed

        remote = "cpu" if self._offload_parameters else None
        # the dtype comes from the config's precision sections: zero.Init's dtype argument is ignored on
        # accelerators without float16 (DeepSpeed 0.19 then always picks bfloat16)
        with deepspeed.zero.Init(config_dict_or_path=self.config, remote_device=remote):
            yield

    @override
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        """Builds the engine for ``module`` and its (at most one) optimizer; returns the engine and the optimizer.

        The scheduler stays the product's: it steps the optimizer's learning rate, which the engine reads.
        """
        if len(optimizers) > 1:
            raise ConfigurationError(
                f"DeepSpeed steps one optimizer per model, but got {len(optimizers)}. Valid: one optimizer (param "
                "groups can hold different learning rates)."
            )
        optimizer = optimizers[0] if optimizers else None
        engine = self._initialize(module, optimizer)
        stepped = [optimizer] if optimizer is not None else self._config_optimizer(engine)
        return engine, stepped, scheduler

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """An engine without a client optimizer (for evaluation, or the config's ``optimizer`` section)."""
        engine: nn.Module = self._initialize(module, None)
        return engine

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if self._engine is not None and optimizer is self._client_optimizer:
            return optimizer
        raise ConfigurationError(
            "DeepSpeedStrategy sets up a module together with its optimizer (one engine holds both): pass both to "
            "setup at once, e.g. `model, optimizer = fabric.setup(model, optimizer)`."
        )

    def _initialize(self, module: nn.Module, optimizer: Optimizer | None) -> DeepSpeedEngine:
        import deepspeed

        if self._engine is not None:
            same = module is self._engine or module is self._engine.module
            raise ConfigurationError(
                "This model is already set up: DeepSpeed builds one engine per model, once."
                if same
                else "DeepSpeedStrategy drives one model per run (one engine), and one is set up already. Valid: "
                "put the models into one nn.Module and set that up, or use a strategy without an engine (ddp, fsdp)."
            )
        config = self.config
        if optimizer is not None and "optimizer" in config:
            raise ConfigurationError(
                "The optimizer is given twice: a torch optimizer was passed to setup and the DeepSpeed config has an "
                "'optimizer' section. Choose one."
            )
        ds_config.announce_op_builds(config)
        parameters = None if optimizer is not None else [p for p in module.parameters() if p.requires_grad]
        with ds_config.without_cpu_shm_op(self.root_device.type == "cpu"):
            engine, _, _, _ = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                model_parameters=parameters if "optimizer" in config else None,
                config=config,
                dist_init_required=False,
            )
        engine.set_gradient_accumulation_boundary(True)  # every backward ends a window unless no_backward_sync says not
        self._engine, self._client_optimizer = engine, optimizer
        return engine

    @staticmethod
    def _config_optimizer(engine: DeepSpeedEngine) -> list[Optimizer]:
        built = engine.optimizer
        return [] if built is None else [built]

    @override
    def module_to_device(self, module: nn.Module) -> None:
        if not any(hasattr(p, "ds_id") for p in module.parameters()):  # zero.Init placed partitioned ones already
            super().module_to_device(module)

    def engine(self) -> DeepSpeedEngine:
        """The engine of the set-up model."""
        if self._engine is None:
            raise ConfigurationError("DeepSpeedStrategy has no engine yet: set the model up first.")
        return self._engine

    # ------------------------------------------------------------------ the step
    @override
    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """``engine.backward``; the loss is already scaled for accumulation by the product (not again here)."""
        self.engine().backward(tensor, *args, scale_wrt_gas=False, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """Runs ``closure`` (if given), then ``engine.step()``: reduce, clip, step, zero the gradients."""
        closure = kwargs.pop("closure", None)
        if kwargs:
            raise ConfigurationError(f"DeepSpeed's step takes no arguments; got {sorted(kwargs)}.")
        result = closure() if closure is not None else None
        self.engine().step()
        return result

    @override
    def zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        """The module's gradients only: the engine owns (and after its step clears) the partitioned ones."""
        self.engine().zero_grad()

    @override
    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        """Backward calls inside are not the end of an accumulation window: DeepSpeed accumulates without reducing."""
        if not enabled or self._engine is None:
            yield
            return
        engine = self._engine
        engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            engine.set_gradient_accumulation_boundary(True)

    @override
    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        raise ConfigurationError(
            "DeepSpeed clips gradients inside its step, by the total norm in its config: pass "
            f"DeepSpeedStrategy(gradient_clipping={max_norm}) (or the Trainer's gradient_clip_val) instead of "
            "clipping by hand."
        )

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: float) -> None:
        raise ConfigurationError(
            "DeepSpeed clips gradients by total norm only, inside its step. Valid: DeepSpeedStrategy("
            "gradient_clipping=...) or the Trainer's gradient_clip_val with gradient_clip_algorithm='norm'."
        )

    # ------------------------------------------------------------------ state
    @override
    def setup_outlives_run(self, module: nn.Module) -> bool:
        return self._engine is not None and module is self._engine  # an engine is built once per model

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The full weights (gathered from the partitions in stage 3), marked as the engine's to save."""
        engine = self.engine()
        inner = engine.module
        if self._stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(inner.parameters()), modifier_rank=None):
                weights = {key: value.detach().clone() for key, value in inner.state_dict().items()}
        else:
            weights = {key: value.detach().clone() for key, value in inner.state_dict().items()}
        return ds_io.EngineState(ds_io.MODULE, weights)

    @override
    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Full weights (every rank passes the same) into the engine's module and its float32 master copy."""
        engine = self.engine()
        inner = engine.module
        if self._stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(inner.parameters()), modifier_rank=0):
                if self.is_global_zero:
                    inner.load_state_dict(state_dict, strict=strict)
        else:
            inner.load_state_dict(state_dict, strict=strict)
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if callable(refresh):
            refresh()

    @override
    def get_optimizer_state(self, optimizer: Optimizer, module: nn.Module | None = None) -> dict[str, Any]:
        """A marker: the optimizer state is partitioned over the ranks and saved by the engine."""
        return ds_io.EngineState(ds_io.OPTIMIZER, {"saved_by": "deepspeed"})

    @override
    def load_optimizer_state(
        self, optimizer: Optimizer, state_dict: dict[str, Any], module: nn.Module | None = None
    ) -> None:
        raise ConfigurationError(
            "DeepSpeed's optimizer state is partitioned over the ranks and loads only from a DeepSpeed checkpoint "
            "directory (strategy.load_checkpoint), not from a state dict."
        )

    @override
    def save_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], filter: StateFilter | None = None
    ) -> None:
        """Every rank writes its partitions in DeepSpeed's format; rank 0 then writes the rest beside them."""
        entries: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in state.items():
            kind = self._engine_kind(value)
            if kind is not None:
                entries[key] = kind
            else:
                rest[key] = value
        if not entries:
            raise ConfigurationError(
                f"The state to save holds no model set up by DeepSpeedStrategy (keys: {sorted(state)}). Valid: "
                "include the set-up model, e.g. {'model': model, 'optimizer': optimizer, ...}."
            )
        plain = self.convert_state(rest, filter)
        # staged next to `path` and moved over it once complete: a save cut short leaves the previous one whole
        target = Path(path)
        staging = target.parent / f".{target.name}.partial"
        if self.is_global_zero:
            remove_path(staging)  # a leftover of an earlier save that was cut short
        self.barrier("deepspeed_save_prepare")
        self.engine().save_checkpoint(os.fspath(staging), tag=ds_io.TAG, client_state={})
        self.barrier("deepspeed_save")
        failure: BaseException | None = None
        if self.is_global_zero:
            try:
                ds_io.write_extra(staging, entries, plain)  # last: a directory without it is an incomplete save
                swap_into_place(staging, target)
            except Exception as error:  # every rank learns of it below; none waits for rank 0 forever
                failure = error
                remove_path(staging)
        if not self.reduce_boolean_decision(failure is None):
            raise failure or RuntimeError(f"Saving the checkpoint {str(target)!r} failed on rank 0; see its error.")

    def _engine_kind(self, value: Any) -> Any:
        """ "module" / "optimizer" (or a list of them) for what the engine holds; ``None`` for anything else."""
        engine = self._engine
        if isinstance(value, ds_io.EngineState):
            return value.kind
        if engine is not None and (value is engine or value is engine.module):
            return ds_io.MODULE
        if engine is not None and value is not None and (value is self._client_optimizer or value is engine.optimizer):
            return ds_io.OPTIMIZER
        if isinstance(value, list) and value:
            kinds = [self._engine_kind(item) for item in value]
            return kinds if all(kind is not None for kind in kinds) else None
        return None

    @override
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """A DeepSpeed directory: the engine loads its partitions (and optimizer state when ``state`` holds the
        optimizer); the other entries come from torchloom's extra file. Other checkpoints: as the base loads them."""
        if not ds_io.is_deepspeed_checkpoint(path):
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        extra = ds_io.read_extra(path)
        saved = {**extra["state"], **extra["entries"]}
        if state is None:
            return ds_io.load_consolidated(path)
        check_entries(path, state, saved, strict)
        engine_keys = [key for key in state if self._engine_kind(state[key]) is not None]
        with_optimizer = any(
            ds_io.OPTIMIZER in (kind if isinstance(kind, list) else [kind])
            for kind in (self._engine_kind(state[key]) for key in engine_keys)
        )
        if engine_keys:
            if weights_only:
                self._check_partitions(path, extra["tag"])
            loaded, _ = self.engine().load_checkpoint(
                os.fspath(path),
                tag=extra["tag"],
                load_module_strict=strict,
                load_optimizer_states=with_optimizer,
                load_lr_scheduler_states=False,
            )
            if loaded is None:
                raise ConfigurationError(f"DeepSpeed found no checkpoint to load at {os.fspath(path)!r}.")
        remainder = dict(extra["state"])
        for key, obj in state.items():
            if key in engine_keys or key not in remainder:
                continue
            value = remainder.pop(key)
            if callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, dict):
                obj.load_state_dict(value)
            else:
                state[key] = value
        return remainder

    def _check_partitions(self, path: str | os.PathLike[str], tag: str) -> None:
        """DeepSpeed unpickles its files with weights_only=False: rank 0 vets them, and every rank refuses alike."""
        problem: str | None = None
        if self.is_global_zero:
            try:
                ds_io.check_partitions(path, tag)
            except CheckpointError as error:
                problem = str(error)
        problem = self.broadcast(problem)
        if problem is not None:
            raise CheckpointError(problem)

    @override
    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, stage={self._stage}, offload_optimizer={self._offload_optimizer})"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: an int >= 1.")
    return value
