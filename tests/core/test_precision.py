"""Precision plugins on the CPU: real autocast, a real GradScaler, real training steps."""

from __future__ import annotations

import io
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core.errors import ConfigurationError
from torchloom.core.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torchloom.core.registry import PRECISIONS

ALL_NAMES = ["64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
PARAM_DTYPE = {
    "64-true": torch.float64,
    "32-true": torch.float32,
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}
COMPUTE_DTYPE = {**PARAM_DTYPE, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@pytest.fixture(autouse=True)
def _default_dtype_is_float32() -> Any:
    assert torch.get_default_dtype() == torch.float32
    yield
    assert torch.get_default_dtype() == torch.float32, "a precision leaked its default dtype"


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def train_step(precision: Precision, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    """One step the way a strategy drives a precision."""
    x, y = precision.convert_input(batch)
    with precision.forward_context():
        out = model(x)
    out = precision.convert_output(out)
    loss = nn.functional.mse_loss(out, y.to(out.dtype))
    scaled = precision.pre_backward(loss, model)
    precision.backward(scaled, model)
    precision.post_backward(scaled, model)
    precision.unscale_gradients(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    precision.optimizer_step(optimizer)
    optimizer.zero_grad()
    return float(loss.detach())


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("64-true", DoublePrecision),
        ("32-true", Precision),
        ("16-mixed", MixedPrecision),
        ("bf16-mixed", MixedPrecision),
        ("16-true", HalfPrecision),
        ("bf16-true", HalfPrecision),
    ],
)
def test_registry_names_resolve_to_the_classes(name: str, cls: type[Precision]) -> None:
    precision = PRECISIONS.get(name)
    assert type(precision) is cls
    assert precision.name == name
    assert precision.compute_dtype == COMPUTE_DTYPE[name]
    assert name in repr(precision)


def test_registry_passes_the_device_type_through() -> None:
    precision = PRECISIONS.get("bf16-mixed", device_type="cuda")
    assert isinstance(precision, MixedPrecision)
    assert precision.device_type == "cuda"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: HalfPrecision(dtype="16-mixed"),  # type: ignore[arg-type]
            r"HalfPrecision\(dtype='16-mixed'\) .*Valid: '16-true', 'bf16-true'",
        ),
        (
            lambda: MixedPrecision(dtype="16-true"),  # type: ignore[arg-type]
            r"MixedPrecision\(dtype='16-true'\) .*Valid: '16-mixed', 'bf16-mixed'",
        ),
        (
            lambda: MixedPrecision(dtype="16-mixed", device_type="tpu"),
            r"device_type='tpu'\) .*Valid: 'cpu', 'cuda', 'mps'",
        ),
        (
            lambda: MixedPrecision(dtype="bf16-mixed", scaler=torch.amp.GradScaler("cpu")),
            "takes no scaler",
        ),
    ],
)
def test_bad_arguments_are_rejected_with_the_valid_choices(build: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build()


# ---------------------------------------------------------------- training works under every precision


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_small_model_trains(name: str) -> None:
    torch.manual_seed(0)
    precision = PRECISIONS.get(name)
    with precision.module_init_context():
        model = small_model()
    model = precision.convert_module(model)
    assert {p.dtype for p in model.parameters()} == {PARAM_DTYPE[name]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    batch = (x, x.sum(dim=1, keepdim=True) * 0.3)
    losses = [train_step(precision, model, optimizer, batch) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert {p.dtype for p in model.parameters()} == {PARAM_DTYPE[name]}


# ---------------------------------------------------------------- dtypes inside and outside the forward context


@pytest.mark.parametrize(("name", "low"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_mixed_runs_the_forward_under_autocast_and_keeps_fp32_params(name: str, low: torch.dtype) -> None:
    precision = PRECISIONS.get(name)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert precision.convert_input(x) is x  # autocast decides per op; inputs are left alone
    with precision.forward_context():
        inside = layer(x)
        assert torch.is_autocast_enabled("cpu")
    assert inside.dtype == low
    assert layer.weight.dtype == torch.float32
    assert layer(x).dtype == torch.float32  # no autocast outside
    converted = precision.convert_output({"out": inside, "labels": torch.tensor([1, 2]), "double": x.double()})
    assert converted["out"].dtype == torch.float32
    assert converted["labels"].dtype == torch.int64
    assert converted["double"].dtype == torch.float64  # only the low-precision results are cast back
    inside.float().sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad.dtype == torch.float32


Pair = namedtuple("Pair", ["features", "label"])


@pytest.mark.parametrize(
    ("name", "dtype"), [("64-true", torch.float64), ("16-true", torch.float16), ("bf16-true", torch.bfloat16)]
)
def test_true_precisions_cast_inputs_and_set_the_default_dtype_in_forward(name: str, dtype: torch.dtype) -> None:
    precision = PRECISIONS.get(name)
    batch = {"x": [Pair(torch.randn(2, 4), torch.tensor([0, 1]))], "note": "kept"}
    converted = precision.convert_input(batch)
    assert converted["x"][0].features.dtype == dtype
    assert converted["x"][0].label.dtype == torch.int64  # integer tensors are never cast
    assert isinstance(converted["x"][0], Pair)
    assert converted["note"] == "kept"
    layer = precision.convert_module(nn.Linear(4, 3))
    with precision.forward_context():
        assert torch.get_default_dtype() == dtype
        out = layer(converted["x"][0].features) + torch.zeros(3)  # a tensor the forward makes itself
    assert out.dtype == dtype
    assert torch.get_default_dtype() == torch.float32
    assert precision.convert_output([out])[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "dtype"), [("64-true", torch.float64), ("16-true", torch.float16), ("bf16-true", torch.bfloat16)]
)
@pytest.mark.parametrize("context", ["module_init_context", "tensor_init_context", "forward_context"])
def test_default_dtype_is_restored_even_on_error(name: str, dtype: torch.dtype, context: str) -> None:
    precision = PRECISIONS.get(name)
    with getattr(precision, context)():
        assert nn.Linear(2, 2).weight.dtype == dtype
    assert torch.get_default_dtype() == torch.float32
    seen: list[torch.dtype] = []

    def failing_user_code() -> None:
        with getattr(precision, context)():
            seen.append(torch.get_default_dtype())
            raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        failing_user_code()
    assert seen == [dtype]
    assert torch.get_default_dtype() == torch.float32


def test_the_default_precision_changes_nothing() -> None:
    precision = Precision()
    layer = nn.Linear(2, 2)
    x = torch.randn(1, 2, dtype=torch.float64)
    assert precision.convert_module(layer) is layer
    assert precision.convert_input(x) is x
    assert precision.convert_output(x) is x
    assert precision.state_dict() == {}
    assert precision.compute_dtype == torch.float32


# ---------------------------------------------------------------- the grad scaler of 16-mixed


def scaled_backward(precision: MixedPrecision, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with precision.forward_context():
        loss: torch.Tensor = model(x).float().pow(2).mean()
    precision.backward(precision.pre_backward(loss, model), model)
    return loss


def test_16_mixed_owns_a_real_scaler_and_bf16_has_none() -> None:
    fp16 = MixedPrecision(dtype="16-mixed")
    assert isinstance(fp16.scaler, torch.amp.GradScaler)
    assert fp16.scaler.is_enabled()
    assert fp16.scaler.get_scale() == 65536.0
    loss = torch.tensor(2.0, requires_grad=True)
    assert fp16.pre_backward(loss, None).item() == 2.0 * 65536.0
    bf16 = MixedPrecision(dtype="bf16-mixed")
    assert bf16.scaler is None
    assert bf16.pre_backward(loss, None) is loss
    assert bf16.state_dict() == {}


def test_an_inf_gradient_skips_the_step_and_halves_the_scale() -> None:
    torch.manual_seed(0)
    precision = MixedPrecision(dtype="16-mixed")
    assert precision.scaler is not None
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaled_backward(precision, model, torch.randn(8, 4))
    assert model.weight.grad is not None
    model.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    precision.optimizer_step(optimizer)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert precision.scaler.get_scale() == 32768.0
    optimizer.zero_grad()
    # a finite step goes through and keeps the scale (small inputs: no fp16 overflow at this scale)
    scaled_backward(precision, model, 0.1 * torch.randn(8, 4))
    precision.optimizer_step(optimizer)
    assert not torch.equal(before[0], model.weight)
    assert precision.scaler.get_scale() == 32768.0


def test_unscale_happens_once_per_step_and_gives_the_true_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    precision = MixedPrecision(dtype="16-mixed", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaled_backward(precision, model, x)
    assert model.weight.grad is not None
    scaled_grad = model.weight.grad.clone()
    precision.unscale_gradients(optimizer)
    precision.unscale_gradients(optimizer)  # clip by norm, then by value: a second unscale must be a no-op
    torch.testing.assert_close(model.weight.grad, scaled_grad / 1024.0)
    precision.optimizer_step(optimizer)
    optimizer.zero_grad()
    # after the step, the next step's gradients get unscaled again
    scaled_backward(precision, model, x)
    scaled_grad = model.weight.grad.clone()
    precision.unscale_gradients(optimizer)
    assert precision.scaler is not None
    torch.testing.assert_close(model.weight.grad, scaled_grad / precision.scaler.get_scale())


def test_two_optimizers_unscaled_before_either_steps_are_unscaled_once() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(8, 4)
    expected = []
    for model in (first, second):  # plain SGD step from the true gradient
        grad = torch.autograd.grad(model(x).pow(2).mean(), model.weight)[0]
        expected.append(model.weight.detach() - 0.1 * grad)
    precision = MixedPrecision(dtype="16-mixed", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (first, second)]
    with torch.autocast("cpu", enabled=False):
        loss = first(x).pow(2).mean() + second(x).pow(2).mean()
    precision.backward(precision.pre_backward(loss, None), None)
    for optimizer in optimizers:  # e.g. clipping both before stepping either
        precision.unscale_gradients(optimizer)
    for optimizer in optimizers:
        precision.optimizer_step(optimizer)
    torch.testing.assert_close(first.weight.detach(), expected[0])
    torch.testing.assert_close(second.weight.detach(), expected[1])


def test_a_closure_is_run_before_the_scaled_step() -> None:
    torch.manual_seed(0)
    # a small start scale, so fp16 gradients cannot overflow and the step is not skipped
    precision = MixedPrecision(dtype="16-mixed", scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    calls: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        loss = scaled_backward(precision, model, x)
        calls.append(loss)
        return loss

    before = model.weight.detach().clone()
    precision.optimizer_step(optimizer, closure=closure)
    assert len(calls) == 1
    assert not torch.equal(before, model.weight)


def test_scaler_state_round_trips_through_state_dict_and_a_file() -> None:
    precision = MixedPrecision(dtype="16-mixed")
    assert precision.scaler is not None
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # two skipped steps: 65536 -> 16384
        scaled_backward(precision, model, torch.randn(8, 4))
        assert model.weight.grad is not None
        model.weight.grad.fill_(float("nan"))
        precision.optimizer_step(optimizer)
        optimizer.zero_grad()
    state = precision.state_dict()
    assert state["scaler"]["scale"] == 16384.0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = MixedPrecision(dtype="16-mixed")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.scaler is not None
    assert restored.scaler.get_scale() == 16384.0
    assert restored.state_dict() == state
    MixedPrecision(dtype="bf16-mixed").load_state_dict(state)  # a scaler state is ignored where there is no scaler


def test_setting_the_device_type_rebuilds_only_a_default_scaler() -> None:
    precision = MixedPrecision(dtype="16-mixed")
    own = precision.scaler
    precision.device_type = "mps"
    assert precision.device_type == "mps"
    assert isinstance(precision.scaler, torch.amp.GradScaler)
    assert precision.scaler is not own
    mine = torch.amp.GradScaler("cpu", init_scale=8.0)
    custom = MixedPrecision(dtype="16-mixed", scaler=mine)
    custom.device_type = "mps"
    assert custom.scaler is mine
    with pytest.raises(ConfigurationError, match="device_type='xla'"):
        custom.device_type = "xla"
    assert custom.device_type == "mps"


# ---------------------------------------------------------------- real GPU


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["16-mixed", "bf16-mixed", "bf16-true"])
def test_training_on_a_gpu(name: str) -> None:
    torch.manual_seed(0)
    precision = PRECISIONS.get(name, device_type="cuda") if name.endswith("mixed") else PRECISIONS.get(name)
    model = precision.convert_module(small_model().cuda())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8, device="cuda")
    batch = (x, x.sum(dim=1, keepdim=True) * 0.3)
    with precision.forward_context():
        assert model(precision.convert_input(x)).dtype == COMPUTE_DTYPE[name]
    losses = [train_step(precision, model, optimizer, batch) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
