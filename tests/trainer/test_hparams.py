"""save_hyperparameters capture, AttributeDict, and the weights_only-safety check."""

from __future__ import annotations

import argparse
import collections
import copy
import io
import pathlib
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.hparams import AttributeDict, HyperparametersMixin, check_hparams_serializable, plain_hparams
from torchloom.trainer.module import LoomModule


def loads_with_weights_only(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------- AttributeDict
def test_attribute_dict_reads_writes_and_deletes_by_attribute() -> None:
    hparams = AttributeDict(lr=0.1)
    hparams.hidden = 32
    assert hparams.lr == 0.1 and hparams["hidden"] == 32
    del hparams.lr
    assert dict(hparams) == {"hidden": 32}
    with pytest.raises(AttributeError, match="'hidden'"):
        _ = hparams.missing
    with pytest.raises(AttributeError):
        del hparams.missing
    assert "hidden" in repr(hparams) and repr(AttributeDict()) == "AttributeDict()"


# ---------------------------------------------------------------------------------------------- capture
class Model(LoomModule):
    def __init__(self, hidden: int, lr: float = 0.1, *args: Any, act: str = "relu", **kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_captures_every_init_argument_with_defaults_kwonly_and_kwargs() -> None:
    model = Model(4, 7, 8, 9, extra="x")
    assert dict(model.hparams) == {"hidden": 4, "lr": 7, "act": "relu", "extra": "x"}  # *args cannot be re-passed
    assert model.hparams.hidden == 4


def test_captures_named_arguments_only_and_rejects_unknown_names() -> None:
    class Named(LoomModule):
        def __init__(self, a: int, b: int, c: int) -> None:
            super().__init__()
            self.save_hyperparameters("a", "c")

    assert dict(Named(1, 2, 3).hparams) == {"a": 1, "c": 3}

    class Wrong(LoomModule):
        def __init__(self, a: int) -> None:
            super().__init__()
            self.save_hyperparameters("a", "zzz")

    with pytest.raises(ConfigurationError, match=r"\['zzz'\].*Valid: 'a'"):
        Wrong(1)


def test_ignore_accepts_a_name_or_a_list() -> None:
    class WithBackbone(LoomModule):
        def __init__(self, backbone: nn.Module, lr: float, tag: str = "t", ignore: Any = "backbone") -> None:
            super().__init__()
            self.save_hyperparameters(ignore=ignore)

    assert set(WithBackbone(nn.Linear(1, 1), 0.5).hparams) == {"lr", "tag", "ignore"}
    assert set(WithBackbone(nn.Linear(1, 1), 0.5, ignore=["backbone", "tag", "nope"]).hparams) == {"lr", "ignore"}


def test_nested_call_records_the_arguments_of_the_outermost_init() -> None:
    class Base(LoomModule):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()

    class Child(Base):
        def __init__(self, hidden: int, lr: float = 0.01) -> None:
            super().__init__(lr=lr * 2)  # the base sees a derived value; cls(**hparams) needs the user's

    child = Child(hidden=8, lr=0.5)
    assert dict(child.hparams) == {"hidden": 8, "lr": 0.5}
    rebuilt = Child(**child.hparams)
    assert rebuilt.hparams == child.hparams
    assert dict(Base(lr=3.0).hparams) == {"lr": 3.0}


def test_nested_objects_of_other_classes_do_not_leak_into_the_capture() -> None:
    class Inner(LoomModule):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.save_hyperparameters()

    class Outer(LoomModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.inner = Inner(width + 1)
            self.save_hyperparameters()

    outer = Outer(3)
    assert dict(outer.hparams) == {"width": 3}
    assert dict(outer.inner.hparams) == {"size": 4}


def test_works_through_a_helper_method_and_with_an_explicit_frame() -> None:
    import inspect

    class ViaHelper(LoomModule):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self._record()

        def _record(self) -> None:
            self.save_hyperparameters(frame=inspect.currentframe())

    assert dict(ViaHelper(2).hparams) == {"depth": 2}


def test_dict_and_namespace_are_taken_as_the_hyper_parameters() -> None:
    class FromConfig(LoomModule):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.save_hyperparameters(config)

    assert dict(FromConfig({"lr": 1.0, "depth": 2}).hparams) == {"lr": 1.0, "depth": 2}
    assert dict(FromConfig(argparse.Namespace(lr=2.0)).hparams) == {"lr": 2.0}
    with pytest.raises(ConfigurationError, match="got 3 of type int"):
        FromConfig(3)


def test_outside_init_is_a_clear_error_unless_a_dict_is_given() -> None:
    module = LoomModule()
    with pytest.raises(ConfigurationError, match="found no __init__ of LoomModule"):
        module.save_hyperparameters()
    module.save_hyperparameters({"a": 1})
    assert dict(module.hparams) == {"a": 1}


def test_hparams_default_empty_and_initial_is_a_frozen_copy() -> None:
    assert dict(LoomModule().hparams) == {} and dict(LoomModule().hparams_initial) == {}
    model = Model(4, lr=[1, 2])  # type: ignore[arg-type]
    model.hparams.lr.append(3)
    model.hparams.hidden = 5
    assert dict(model.hparams_initial) == {"hidden": 4, "lr": [1, 2], "act": "relu"}
    model.hparams_initial["hidden"] = 99
    assert model.hparams_initial.hidden == 4


def test_plain_mixin_works_on_any_class() -> None:
    class Plain(HyperparametersMixin):
        def __init__(self, x: int) -> None:
            self.save_hyperparameters()

    assert dict(Plain(1).hparams) == {"x": 1}


def test_warns_at_capture_when_a_value_would_make_checkpoints_fail() -> None:
    class WithPath(LoomModule):
        def __init__(self, root: pathlib.Path) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.warns(UserWarning, match="'root'.*weights_only"):
        WithPath(pathlib.Path("/tmp"))


def test_module_hparams_survive_deepcopy_and_pickling() -> None:
    model = Model(4)
    assert copy.deepcopy(model).hparams == model.hparams


# ---------------------------------------------------------------------------------------------- weights_only safety
class Custom:
    pass


SAFE: list[Any] = [
    None,
    True,
    3,
    1.5,
    float("nan"),
    1 + 2j,
    "text",
    b"bytes",
    [1, "a"],
    (1, 2.0),
    {"nested": {"deeper": [1, {"x": None}]}},
    {1: "int key", (1, 2): "tuple key"},
    {1, 2},
    collections.OrderedDict(a=1),
    torch.float16,
    torch.device("cpu"),
    torch.Size([2, 3]),
    torch.arange(3),
    nn.Parameter(torch.ones(2)),
]
UNSAFE: list[Any] = [
    pathlib.Path("/tmp/data"),
    argparse.Namespace(a=1),
    Custom(),
    Custom,
    torch.optim.Adam,
    frozenset({1}),
    collections.defaultdict(list),
    range(3),
    slice(1, 2),
    nn.Linear(1, 1),
    lambda x: x,
    [1, [2, pathlib.Path("deep")]],
    {"inner": {"p": pathlib.Path("x")}},
    {pathlib.Path("key"): 1},
]


@pytest.mark.parametrize("value", SAFE + UNSAFE, ids=lambda v: type(v).__name__)
def test_check_agrees_with_a_real_weights_only_round_trip(value: Any) -> None:
    hparams = {"value": value, "lr": 0.1}
    torch_accepts = loads_with_weights_only(hparams)
    assert torch_accepts == any(value is s for s in SAFE)
    if torch_accepts:
        check_hparams_serializable(hparams)
    else:
        with pytest.raises(ConfigurationError, match="'value'") as info:
            check_hparams_serializable(hparams)
        assert isinstance(info.value, ValueError) and "ignore=['value']" in str(info.value)


def test_error_names_the_path_and_type_of_the_innermost_bad_value() -> None:
    with pytest.raises(ConfigurationError, match=r"hparams\['data'\]\['paths'\]\[1\] has type pathlib\.\w*Path"):
        check_hparams_serializable({"ok": 1, "data": {"paths": ["a", pathlib.Path("b")]}})
    with pytest.raises(ConfigurationError, match=r"<key PosixPath\('k'\)> has type pathlib"):
        check_hparams_serializable({"data": {pathlib.Path("k"): 1}})
    with pytest.raises(ConfigurationError, match=r"hparams\['s'\] has type builtins\.frozenset"):
        check_hparams_serializable({"s": frozenset({1})})  # its items load; the container does not


def test_attribute_dicts_are_stored_as_plain_dicts() -> None:
    hparams = AttributeDict(a=1, sub=AttributeDict(b=[AttributeDict(c=2)]))
    plain = plain_hparams(hparams)
    assert plain == {"a": 1, "sub": {"b": [{"c": 2}]}}
    assert type(plain["sub"]) is dict and type(plain["sub"]["b"][0]) is dict
    assert not loads_with_weights_only(dict(hparams)) and loads_with_weights_only(plain)
    check_hparams_serializable(hparams)


def test_types_allowed_with_torch_safe_globals_pass() -> None:
    with torch.serialization.safe_globals([Custom]):
        check_hparams_serializable({"custom": Custom()})
    with pytest.raises(ConfigurationError, match="Custom"):
        check_hparams_serializable({"custom": Custom()})


def test_a_captured_module_round_trips_through_a_weights_only_checkpoint() -> None:
    model = Model(4, lr=0.2, act="gelu", sizes=[1, 2])
    check_hparams_serializable(model.hparams)
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": plain_hparams(model.hparams)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["hyper_parameters"]
    assert Model(**loaded).hparams == model.hparams
