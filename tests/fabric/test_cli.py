"""The `torchloom` console script: option checks (no processes), launches of plain-Python workers through
torch.distributed.run in this process, and Fabric scripts end to end (one node x 2 devices, 2 nodes x 1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from torchloom.core.errors import ConfigurationError
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.fabric.cli import RunPlan, build_parser, main, plan_run, script_strategies
from torchloom.fabric.connector import CLI_USED_ENV, ENV_VARS

SCRIPTS = Path(__file__).parent / "cli_scripts"
TIMEOUT = 120  # seconds for one CLI run; a healthy one takes ~10 s here
OPTIONS = ("--accelerator", "--strategy", "--devices", "--num-nodes", "--node-rank", "--main-address", "--main-port")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TORCHLOOM_* variables from outside, no GPU (tests that want one patch it), and os.environ restored
    after an in-process launch (which exports the CLI's variables)."""
    saved = dict(os.environ)
    for name in [CLI_USED_ENV, *ENV_VARS.values()]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _plan(*argv: str) -> RunPlan:
    return plan_run(build_parser().parse_args(["run", *argv]))


def _torchrun_args(plan: RunPlan) -> dict[str, object]:
    from torch.distributed.run import get_args_parser

    return vars(get_args_parser().parse_args(plan.torchrun_args))


# --------------------------------------------------------------- help


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "run" in capsys.readouterr().out


def test_help_documents_every_run_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "launch a Fabric script" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (*OPTIONS, "--precision", "SCRIPT", "SCRIPT_ARGS"):
        assert option in text


# --------------------------------------------------------------- planning (no processes)


def test_defaults_start_one_process_and_export_the_layout() -> None:
    script = str(SCRIPTS / "env_dump.py")
    plan = _plan(script, "--devices", "7")
    assert plan.nproc_per_node == 1
    assert plan.env == {CLI_USED_ENV: "1", "TORCHLOOM_DEVICES": "1", "TORCHLOOM_NUM_NODES": "1"}
    args = _torchrun_args(plan)
    assert (args["nnodes"], args["nproc_per_node"], args["node_rank"]) == ("1", "1", 0)
    assert args["rdzv_backend"] == "static"
    assert args["master_port"] is None  # one node: torch picks a free port
    assert args["max_restarts"] == 0
    assert args["training_script"] == script
    assert args["training_script_args"] == ["--devices", "7"]  # after SCRIPT, options are the script's


def test_given_options_are_checked_normalised_and_exported() -> None:
    plan = _plan(
        "--accelerator",
        "CPU",
        "--strategy",
        "DDP",
        "--devices",
        "2",
        "--precision",
        "bf16",
        str(SCRIPTS / "env_dump.py"),
    )
    assert plan.nproc_per_node == 2
    assert plan.env == {
        CLI_USED_ENV: "1",
        "TORCHLOOM_ACCELERATOR": "cpu",
        "TORCHLOOM_STRATEGY": "ddp",
        "TORCHLOOM_DEVICES": "2",
        "TORCHLOOM_NUM_NODES": "1",
        "TORCHLOOM_PRECISION": "bf16-mixed",
    }


def test_several_nodes_use_a_static_rendezvous_at_node_zero() -> None:
    common = ("--num-nodes", "2", "--node-rank", "1", "--main-address", "10.1.2.3")
    args = _torchrun_args(_plan(*common, str(SCRIPTS / "env_dump.py")))
    assert (args["nnodes"], args["node_rank"], args["master_addr"]) == ("2", 1, "10.1.2.3")
    assert args["master_port"] == 29500  # the nodes must agree on it: a fixed default
    args = _torchrun_args(_plan(*common, "--main-port", "4321", str(SCRIPTS / "env_dump.py")))
    assert args["master_port"] == 4321
    assert _plan(*common, str(SCRIPTS / "env_dump.py")).env["TORCHLOOM_NUM_NODES"] == "2"


def test_gpu_devices_count_processes_and_keep_their_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    script = str(SCRIPTS / "env_dump.py")
    plan = _plan("--accelerator", "cuda", "--devices", "0,2", script)
    assert (plan.nproc_per_node, plan.env["TORCHLOOM_DEVICES"]) == (2, "0,2")
    assert "CUDA_VISIBLE_DEVICES" not in plan.env
    plan = _plan("--accelerator", "cuda", "--devices", "1,", script)
    assert (plan.nproc_per_node, plan.env["TORCHLOOM_DEVICES"]) == (1, "1,")
    plan = _plan("--accelerator", "gpu", script)  # devices auto: every GPU
    assert (plan.nproc_per_node, plan.env["TORCHLOOM_DEVICES"]) == (4, "4")
    plan = _plan(script)  # no --accelerator: counted with what 'auto' picks here, and not exported
    assert (plan.nproc_per_node, plan.env["TORCHLOOM_DEVICES"]) == (4, "4")
    assert "TORCHLOOM_ACCELERATOR" not in plan.env
    with pytest.raises(ConfigurationError, match="the available GPU indices are 0, 1, 2, 3"):
        _plan("--accelerator", "cuda", "--devices", "5", script)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--precision", "bf17"], ["--precision", "'bf17'", "'bf16-mixed'"]),
        (["--accelerator", "cpx"], ["--accelerator 'cpx'", "'cpu'", "'cuda'"]),
        (["--accelerator", "cuda"], ["'cuda' is not available", "'cpu'"]),
        (["--accelerator", "tpu"], ["torch-xla starts the TPU processes", "'cpu'"]),
        (["--accelerator", "cpu", "--devices", "0,1"], ["--devices", "'0,1'", "Accepted forms"]),
        (["--devices", "zero"], ["--devices", "'zero'", "Accepted forms"]),
        (["--strategy", "ddp_spawn"], ["'ddp_spawn' starts its own worker processes", "'ddp'"]),
        (["--strategy", "ddp_notebook"], ["'ddp_notebook'", "'auto', 'ddp'"]),
        (["--strategy", "dpp"], ["--strategy 'dpp' is not valid", "'ddp'"]),
        (["--num-nodes", "0"], ["--num-nodes 0", "positive int"]),
        (["--num-nodes", "2", "--node-rank", "2"], ["--node-rank 2", "0, 1"]),
        (["--main-port", "70000"], ["--main-port 70000", "1 to 65535"]),
    ],
)
def test_bad_options_fail_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    assert main(["run", *argv, str(SCRIPTS / "env_dump.py")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("torchloom run: error:")
    for fragment in fragments:
        assert fragment in error
    assert CLI_USED_ENV not in os.environ  # nothing was exported, nothing launched


def test_a_missing_script_fails_before_anything_starts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_only_script_launched_strategies_are_offered() -> None:
    class XLALike(DDPStrategy):
        uses_xla = True

    STRATEGIES.register("cli_test_ddp", DDPStrategy)  # default start method: popen
    STRATEGIES.register("cli_test_spawn", DDPStrategy, start_method="spawn")
    STRATEGIES.register("cli_test_xla", XLALike)
    try:
        valid = script_strategies()
    finally:
        for name in ("cli_test_ddp", "cli_test_spawn", "cli_test_xla"):
            STRATEGIES.remove(name)
    assert {"auto", "ddp", "single_device", "cli_test_ddp"} <= set(valid)
    assert not {"ddp_spawn", "ddp_fork", "ddp_notebook", "cli_test_spawn", "cli_test_xla"} & set(valid)


# --------------------------------------------------------------- launching plain-Python workers in this process


def test_run_starts_the_workers_with_the_variables_and_arguments(tmp_path: Path) -> None:
    options = ["--accelerator", "cpu", "--devices", "2", "--precision", "16-mixed"]
    status = main(["run", *options, str(SCRIPTS / "env_dump.py"), str(tmp_path), "--lr", "0.1"])
    assert status == 0
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert (record["RANK"], record["LOCAL_RANK"], record["WORLD_SIZE"]) == (str(rank), str(rank), "2")
        assert record["TORCHLOOM_CLI_USED"] == "1"
        assert record["TORCHLOOM_ACCELERATOR"] == "cpu"
        assert record["TORCHLOOM_DEVICES"] == "2"
        assert record["TORCHLOOM_PRECISION"] == "16-mixed"
        assert record["OMP_NUM_THREADS"] == "1"
        assert record["argv"] == ["--lr", "0.1"]


def test_run_exits_with_the_failed_workers_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--accelerator", "cpu", "--devices", "2", str(SCRIPTS / "exit_on_rank_one.py")]) == 3
    error = capsys.readouterr().err
    assert "torchloom run: error: Worker with global rank 1 (local rank 1, pid " in error
    assert "exited with code 3." in error


# --------------------------------------------------------------- Fabric scripts end to end (subprocesses)


def _child_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TORCHLOOM_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _console_script() -> str:
    found = Path(sys.executable).parent / "torchloom"
    path = str(found) if found.exists() else shutil.which("torchloom")
    assert path, "the `torchloom` console script is not installed: pip install -e packages/fabric"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"`torchloom run` did not finish within {TIMEOUT} s:\n{output}")
    return process.returncode, output


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_fabric_script_on_two_devices() -> None:
    script = str(SCRIPTS / "fabric_world.py")
    command = [_console_script(), "run", "--devices", "2", "--precision", "bf16-mixed", script]
    status, output = _wait(_start([*command, "--world-size", "2", "--devices", "7"]))
    assert status == 0, output
    for rank in (0, 1):
        assert f"rank={rank} node=0 world=2 sum=3 precision=bf16-mixed device=cpu" in output, output
    # the code's values lost to the CLI's, and rank 0 alone said so, once per argument
    assert output.count("torchloom: Fabric(devices=3) in the code, --devices 2 from the CLI: using 2") == 1, output
    assert output.count("Fabric(precision='32-true') in the code, --precision bf16-mixed from the CLI") == 1, output


@pytest.mark.slow
def test_two_nodes_on_one_machine() -> None:
    port = str(_free_port())
    script = str(SCRIPTS / "fabric_world.py")
    nodes = []
    # node 0 through the console script, node 1 through `python -m`: both entry points form one job
    for node_rank, entry in enumerate([[_console_script()], [sys.executable, "-m", "torchloom.fabric.cli"]]):
        options = ["--accelerator", "cpu", "--devices", "1", "--num-nodes", "2", "--node-rank", str(node_rank)]
        options += ["--main-address", "127.0.0.1", "--main-port", port]
        nodes.append(_start([*entry, "run", *options, script, "--world-size", "2", "--devices", "7"]))
    try:
        results = [_wait(process) for process in nodes]
    finally:
        for process in nodes:
            if process.poll() is None:
                process.kill()
    for node_rank, (status, output) in enumerate(results):
        assert status == 0, output
        assert f"rank={node_rank} node={node_rank} world=2 sum=3 precision=32-true device=cpu" in output, output


@pytest.mark.cuda
def test_fabric_script_on_one_gpu() -> None:
    command = [_console_script(), "run", "--accelerator", "cuda", "--devices", "1", str(SCRIPTS / "fabric_world.py")]
    status, output = _wait(_start([*command, "--world-size", "1", "--devices", "7"]))
    assert status == 0, output
    assert "rank=0 node=0 world=1 sum=1 precision=32-true device=cuda" in output, output
    assert "Fabric(accelerator='cpu') in the code, --accelerator cuda from the CLI: using 'cuda'" in output, output


def test_sigterm_to_run_reaches_every_worker_and_exits_with_its_status(tmp_path: Path) -> None:
    """The agent passes SIGTERM on (a worker watching for preemption saves and stops), says so, and exits
    128 + 15 without a traceback."""
    command = [_console_script(), "run", "--devices", "2", str(SCRIPTS / "wait_for_sigterm.py"), str(tmp_path)]
    process = _start(command)
    deadline = time.monotonic() + TIMEOUT
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    status, output = _wait(process)
    assert status == 128 + signal.SIGTERM, output
    assert all((tmp_path / f"stopped{rank}").exists() for rank in (0, 1)), output
    assert "torchloom: the launcher received SIGTERM and passed it on to the workers" in output
    assert "Traceback" not in output
