"""The named registries: built-in names and presets, case-insensitivity, override rules, entry-point plugins.

Plugins are tested twice: with a patched ``entry_points`` list, and with a real (tiny) installed
distribution, a module plus a ``*.dist-info`` folder on ``sys.path``, used by name through the Connector.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from torchloom.core import registry as registry_module
from torchloom.core.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator
from torchloom.core.connector import Connector
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision import DoublePrecision
from torchloom.core.registry import ACCELERATORS, PRECISIONS, STRATEGIES, Registry
from torchloom.core.strategies import DDPStrategy, SingleDeviceStrategy

GROUP = "torchloom.test_things"


@pytest.fixture
def things() -> Registry[Any]:
    return Registry("thing", GROUP)


def patch_entry_points(monkeypatch: pytest.MonkeyPatch, *points: EntryPoint) -> list[str]:
    """Makes the registry see ``points``; returns a log of the groups it asked for."""
    asked: list[str] = []

    def entry_points(group: str) -> list[EntryPoint]:
        asked.append(group)
        return [point for point in points if point.group == group]

    monkeypatch.setattr(registry_module, "entry_points", entry_points)
    return asked


# ---------------------------------------------------------------------- built-ins
@pytest.mark.parametrize(
    ("name", "cls"),
    [("cpu", CPUAccelerator), ("cuda", CUDAAccelerator), ("mps", MPSAccelerator), ("tpu", XLAAccelerator)],
)
def test_builtin_accelerators(name: str, cls: type) -> None:
    assert ACCELERATORS.factory(name) is cls
    assert type(ACCELERATORS.get(name)) is cls
    assert ACCELERATORS.description(name)


@pytest.mark.parametrize(
    ("name", "start_method"),
    [("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp_notebook", "notebook")],
)
def test_ddp_presets_are_one_class_with_other_arguments(name: str, start_method: str) -> None:
    assert STRATEGIES.factory(name) is DDPStrategy
    assert STRATEGIES.init_params(name) == {"start_method": start_method}
    strategy = STRATEGIES.get(name)
    assert type(strategy) is DDPStrategy
    assert strategy.start_method == start_method


def test_builtin_names() -> None:
    assert {"cpu", "cuda", "mps", "tpu"} <= set(ACCELERATORS.names())
    assert {"64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"} <= set(PRECISIONS.names())
    assert {"single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"} <= set(STRATEGIES)
    assert STRATEGIES.factory("single_device") is SingleDeviceStrategy


def test_get_overrides_the_preset_for_one_call_only() -> None:
    assert STRATEGIES.get("ddp", start_method="fork").start_method == "fork"
    assert STRATEGIES.get("ddp").start_method == "popen"
    assert STRATEGIES.init_params("ddp") == {"start_method": "popen"}
    params = STRATEGIES.init_params("ddp")
    params["start_method"] = "spawn"  # a copy: changing it changes nothing
    assert STRATEGIES.get("ddp").start_method == "popen"


# ---------------------------------------------------------------------- names
def test_names_are_case_insensitive(things: Registry[Any]) -> None:
    things.register("MyThing", dict, description="a dict", colour="red")
    assert things.names() == ["mything"]
    for spelling in ("mything", "MYTHING", "myThing"):
        assert spelling in things
        assert things.get(spelling) == {"colour": "red"}
    assert "DDP_Spawn" in STRATEGIES
    assert STRATEGIES.get("DDP_SPAWN").start_method == "spawn"


def test_unknown_names_list_the_valid_ones(things: Registry[Any]) -> None:
    things.register("alpha", dict)
    things.register("beta", list)
    for lookup in (things.get, things.factory, things.init_params, things.description):
        with pytest.raises(ConfigurationError, match=r"Unknown thing 'gamma'\. Valid thing names: 'alpha', 'beta'\."):
            lookup("gamma")
    assert 5 not in things
    assert None not in things


def test_registering_a_name_twice_needs_override(things: Registry[Any]) -> None:
    things.register("alpha", dict, a=1)
    with pytest.raises(ConfigurationError, match=r"'ALPHA' is already registered; pass override=True"):
        things.register("ALPHA", list)
    assert things.get("alpha") == {"a": 1}
    things.register("Alpha", dict, override=True, b=2)
    assert things.get("alpha") == {"b": 2}
    things.remove("ALPHA")
    assert "alpha" not in things
    things.remove("alpha")  # removing a missing name is fine


def test_import_path_factories_load_on_first_use(things: Registry[Any]) -> None:
    things.register("ordered", "collections:OrderedDict", x=1)
    assert things.factory("ordered").__name__ == "OrderedDict"
    assert dict(things.get("ordered")) == {"x": 1}
    things.register("missing", "torchloom_no_such_module:Thing")
    assert "missing" in things  # registering does not import
    with pytest.raises(ModuleNotFoundError):
        things.factory("missing")


# ---------------------------------------------------------------------- entry points (patched list)
def test_entry_points_add_names_lazily(monkeypatch: pytest.MonkeyPatch, things: Registry[Any]) -> None:
    asked = patch_entry_points(
        monkeypatch,
        EntryPoint(name="Ordered", value="collections:OrderedDict", group=GROUP),
        EntryPoint(name="elsewhere", value="collections:deque", group="another.group"),
    )
    things.register("alpha", dict)
    assert "alpha" in things
    assert asked == []  # a known name needs no plugin scan
    assert "ordered" in things
    assert things.names() == ["alpha", "ordered"]
    assert asked == [GROUP]  # scanned once, then remembered
    assert things.factory("ORDERED").__name__ == "OrderedDict"
    assert "plugin from collections:OrderedDict" in things.description("ordered")


def test_explicit_registration_wins_over_a_plugin(monkeypatch: pytest.MonkeyPatch, things: Registry[Any]) -> None:
    patch_entry_points(monkeypatch, EntryPoint(name="alpha", value="collections:OrderedDict", group=GROUP))
    things.register("Alpha", dict)
    assert things.names() == ["alpha"]
    assert things.factory("alpha") is dict


def test_a_broken_plugin_is_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch, things: Registry[Any]) -> None:
    patch_entry_points(
        monkeypatch,
        EntryPoint(name="broken", value="torchloom_no_such_module:Thing", group=GROUP),
        EntryPoint(name="fine", value="collections:OrderedDict", group=GROUP),
    )
    with pytest.warns(UserWarning, match=r"Skipping the thing plugin 'broken'.*torchloom_no_such_module"):
        names = things.names()
    assert names == ["fine"]
    with pytest.raises(ConfigurationError, match=r"Unknown thing 'broken'.*'fine'"):
        things.get("broken")


def test_reload_sees_plugins_installed_later(monkeypatch: pytest.MonkeyPatch, things: Registry[Any]) -> None:
    patch_entry_points(monkeypatch)
    assert things.names() == []
    patch_entry_points(monkeypatch, EntryPoint(name="late", value="collections:OrderedDict", group=GROUP))
    assert "late" not in things.names()  # the scan is remembered
    things.reload_entry_points()
    assert things.names() == ["late"]


def test_a_plugin_precision_is_usable_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    point = EntryPoint(
        name="Plugin-64", value="torchloom.core.precision.double:DoublePrecision", group=PRECISIONS.entry_point_group
    )
    patch_entry_points(monkeypatch, point)
    PRECISIONS.reload_entry_points()
    try:
        assert type(Connector(precision="plugin-64").resolve().precision) is DoublePrecision
    finally:
        PRECISIONS.remove("plugin-64")


# ---------------------------------------------------------------------- a real installed plugin
PLUGIN_MODULE = '''
"""A third-party package adding a strategy to torchloom."""
from torchloom.core.strategies.ddp import DDPStrategy


class DemoDDPStrategy(DDPStrategy):
    """DDP with one extra attribute, to show the plugin class is the one in use."""

    from_plugin = True
'''


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[Path]:
    """A distribution ``tl-demo-plugin`` on ``sys.path``, with an entry point in ``torchloom.strategies``."""
    (tmp_path / "tl_demo_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "tl_demo_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tl-demo-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[torchloom.strategies]\nDemo_DDP = tl_demo_plugin:DemoDDPStrategy\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        yield tmp_path
    STRATEGIES.remove("demo_ddp")
    sys.modules.pop("tl_demo_plugin", None)
    STRATEGIES.reload_entry_points()  # forget the plugin now that it is off sys.path


def test_a_real_installed_plugin_strategy_is_usable_by_name(installed_plugin: Path) -> None:
    STRATEGIES.reload_entry_points()
    assert "demo_ddp" in STRATEGIES.names()
    assert STRATEGIES.description("demo_ddp") == "plugin from tl_demo_plugin:DemoDDPStrategy"
    setup = Connector(strategy="Demo_DDP", accelerator="cpu", devices=2).resolve()
    strategy = setup.strategy
    assert type(strategy).__name__ == "DemoDDPStrategy"
    assert type(strategy).__module__ == "tl_demo_plugin"
    assert isinstance(strategy, DDPStrategy)
    assert getattr(strategy, "from_plugin", False)
    assert strategy.parallel_devices == setup.devices
    assert strategy.accelerator is setup.accelerator
    assert setup.launcher is not None
