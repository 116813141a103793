"""Single-process tests of the launchers: commands, elastic configuration, error mapping, refusals.

Real worker processes are started in tests/integration/test_ddp.py.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.errors import ConfigurationError, WorkerFailedError
from torchloom.core.launchers import multiprocessing as mp_launcher
from torchloom.core.launchers import subprocess_script
from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher, script_command
from torchloom.core.strategies.ddp import DDPStrategy


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE")
    for name in (*names, "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "")  # recorded, so whatever the test sets is undone afterwards
        monkeypatch.delenv(name)


def fake_main(monkeypatch: pytest.MonkeyPatch, file: str | None = None, spec_name: str | None = None) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None  # type: ignore[assignment]
    if file:
        main.__file__ = file
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [file or "-c", "--lr", "0.1"])


# ---------------------------------------------------------------------- re-running the script
def test_script_command_for_a_script_and_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch, file="train.py")
    assert script_command() == [os.path.abspath("train.py"), "--lr", "0.1"]
    fake_main(monkeypatch, file="/x/pkg/__main__.py", spec_name="pkg.__main__")
    assert script_command() == ["-m", "pkg", "--lr", "0.1"]
    fake_main(monkeypatch, file="/x/pkg/train.py", spec_name="pkg.train")
    assert script_command() == ["-m", "pkg.train", "--lr", "0.1"]


def test_script_command_refuses_an_interactive_session(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch)
    with pytest.raises(ConfigurationError, match="ddp_notebook"):
        script_command()


def test_agent_configures_elastic_and_exits_after_success(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any, tuple[str, ...]]] = []

    class FakeElasticLaunch:
        def __init__(self, config: Any, entrypoint: Any) -> None:
            self.config, self.entrypoint = config, entrypoint

        def __call__(self, *args: str) -> dict[int, None]:
            calls.append((self.config, self.entrypoint, args))
            return {0: None, 1: None}

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", FakeElasticLaunch)
    fake_main(monkeypatch, file="train.py")
    monkeypatch.setenv("MASTER_PORT", "29511")
    launcher = SubprocessScriptLauncher(LocalEnvironment(), 2, timeout=datetime.timedelta(seconds=90))
    assert not launcher.is_interactive_compatible and not launcher.in_worker

    with pytest.raises(SystemExit) as exited:
        launcher.launch(lambda: pytest.fail("the agent must not run the function"))
    assert exited.value.code == 0
    (config, entrypoint, args), *_ = calls
    assert entrypoint == sys.executable and args == (os.path.abspath("train.py"), "--lr", "0.1")
    assert (config.nproc_per_node, config.min_nodes, config.max_nodes, config.max_restarts) == (2, 1, 1, 0)
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "127.0.0.1:29511"
    assert config.rdzv_configs == {"rank": 0, "timeout": 90}
    assert config.monitor_interval <= 0.5  # survivors die well within 30 s
    # torch 2.9's LaunchConfig has neither option: its agent waits 30 s and does not pass SIGUSR1 on
    assert getattr(config, "shutdown_timeout", 0) <= 15
    assert "SIGUSR1" in getattr(config, "signals_to_handle", "SIGUSR1")
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_agent_for_a_second_node(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[Any] = []

    def fake_elastic_launch(config: Any, entrypoint: Any) -> Any:
        captured.append(config)
        return lambda *args: None

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", fake_elastic_launch)
    fake_main(monkeypatch, file="train.py")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with pytest.raises(SystemExit):
        SubprocessScriptLauncher(LocalEnvironment(), 1, num_nodes=2).launch(print)
    config = captured[0]
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 1)
    assert config.rdzv_endpoint == "10.0.0.1:29512" and config.rdzv_configs["rank"] == 1
    assert os.environ["OMP_NUM_THREADS"] == "4"  # the user's choice is kept


def test_two_nodes_without_an_agreed_port_are_refused(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch, file="train.py")
    with pytest.raises(ConfigurationError, match="MASTER_ADDR"):
        SubprocessScriptLauncher(LocalEnvironment(), 2, num_nodes=2).launch(print)
    with pytest.raises(ConfigurationError, match="num_processes=0"):
        SubprocessScriptLauncher(LocalEnvironment(), 0)


def test_in_a_worker_launch_runs_the_function_and_records_its_error(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    launcher = SubprocessScriptLauncher(LocalEnvironment(), 2)
    assert launcher.in_worker
    assert launcher.launch(lambda a, b=0: a + b, 2, b=3) == 5

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def broken() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        launcher.launch(broken)
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == "ValueError: bad batch" and "broken" in recorded["extraInfo"]["py_callstack"]


def failure(tmp_path: Path, local_rank: int, exitcode: int, error: str | None = None, age: float = 0) -> ProcessFailure:
    path = tmp_path / f"error_{local_rank}.json"
    if error is not None:
        info = {"py_callstack": f"Traceback (most recent call last):\n{error}\n", "timestamp": str(int(time.time()))}
        path.write_text(json.dumps({"message": {"message": error, "extraInfo": info}}))
        os.utime(path, (time.time() - age, time.time() - age))
    return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode, error_file=str(path))


def test_elastic_failure_names_the_root_cause(tmp_path: Path) -> None:
    # the culprit raised first; its peer failed a moment later because of it; another was terminated
    failures = {
        0: failure(tmp_path, 0, 1, "RuntimeError: Connection closed by peer", age=0.0),
        1: failure(tmp_path, 1, 1, "ValueError: boom", age=0.05),
        2: failure(tmp_path, 2, -signal.SIGTERM),
    }
    error = subprocess_script.worker_failed_error(ChildFailedError("train.py", failures))
    assert isinstance(error, WorkerFailedError) and error.rank == 1 and error.exitcode == 1
    assert str(error).startswith("Worker with global rank 1 (local rank 1, pid 101) exited with code 1.")
    assert "ValueError: boom" in str(error) and "rank 2 (pid 102) was killed by signal SIGTERM" in str(error)

    killed = {
        0: failure(tmp_path, 0, 1, "RuntimeError: Connection closed by peer", age=1.0),
        3: failure(tmp_path, 3, -9),
    }
    error = subprocess_script.worker_failed_error(ChildFailedError("train.py", killed))
    assert error.rank == 3 and error.exitcode == -9 and "killed by signal SIGKILL" in str(error)
    assert "left no traceback" in str(error)


# ---------------------------------------------------------------------- torch.multiprocessing
def ddp(start_method: str) -> DDPStrategy:
    return DDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * 2,
        cluster_environment=LocalEnvironment(),
        start_method=start_method,
    )


def test_multiprocessing_launcher_start_methods() -> None:
    assert not MultiprocessingLauncher(ddp("spawn"), "spawn").is_interactive_compatible
    assert MultiprocessingLauncher(ddp("fork"), "fork").is_interactive_compatible
    notebook = MultiprocessingLauncher(ddp("notebook"), "notebook")
    assert notebook.is_interactive_compatible and notebook.start_method == "notebook"
    with pytest.raises(ConfigurationError, match=r"start_method='forkserver'.*'spawn', 'fork', 'notebook'"):
        MultiprocessingLauncher(ddp("spawn"), "forkserver")


def test_fork_where_the_platform_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.multiprocessing.get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ConfigurationError, match="ddp_spawn"):
        MultiprocessingLauncher(ddp("notebook"), "notebook")


@pytest.mark.parametrize("start_method", ["fork", "notebook"])
def test_fork_refuses_after_cuda_was_initialised(monkeypatch: pytest.MonkeyPatch, start_method: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(mp_launcher, "start_processes", lambda *a, **k: pytest.fail("must refuse before starting"))
    launcher = MultiprocessingLauncher(ddp(start_method), start_method)
    with pytest.raises(ConfigurationError, match=r"CUDA is already initialised.*ddp_spawn"):
        launcher.launch(print)


def test_spawn_explains_an_unpicklable_function(clean_env: None) -> None:
    launcher = MultiprocessingLauncher(ddp("spawn"), "spawn")
    local_value = 3
    with pytest.raises(ConfigurationError, match="pickle"):
        launcher.launch(lambda: local_value)
    assert "MASTER_PORT" not in os.environ  # the port picked for the failed launch was released
