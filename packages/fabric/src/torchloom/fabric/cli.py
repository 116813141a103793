"""The ``torchloom`` console script: ``torchloom run [OPTIONS] SCRIPT [SCRIPT_ARGS...]`` and
``torchloom consolidate CHECKPOINT_DIR OUTPUT_FILE`` (a sharded checkpoint -> one file, see
``torchloom.core.checkpoint.consolidate``).

``run`` checks the options first (a typo fails at once, naming the valid values), exports them as the
``TORCHLOOM_*`` variables that ``FabricConnector`` reads in every worker (the CLI's values win over the
code's), then starts the workers with ``torch.distributed.run`` in this process, as ``torchrun`` does,
and exits with the job's status. When the job fails, it prints the worker that failed first with its
traceback, then the others it stopped, and exits with that worker's code (128 + N for signal N).
Options go before SCRIPT; everything after SCRIPT is the script's.

Decisions:

- Processes per node: the number of local devices, ``accelerator.parse_devices(devices)`` for the
  ``--accelerator`` given, or for the one ``"auto"`` picks on this machine. The resolved form is
  exported as ``TORCHLOOM_DEVICES`` (a count, or the index list as given) so the workers' Fabric
  always agrees with the number of processes started, whatever the code says. GPU index lists are
  passed through as indices (``--devices 0,2``: local rank 0 uses ``cuda:0``, local rank 1 ``cuda:2``);
  ``CUDA_VISIBLE_DEVICES`` is left alone, since renumbering the GPUs would break those indices.
- ``--accelerator``, ``--strategy`` and ``--precision`` are exported only when given, so the code's
  choice stands otherwise (``strategy="auto"`` picks ``"ddp"`` in a worker when there is more than one
  process). ``--devices`` (default ``auto``) and ``--num-nodes`` are always exported.
- Strategies that start their own processes (spawn / fork / notebook, XLA) and the ``tpu``
  accelerator (torch-xla starts its own processes) are refused.
- Rendezvous is static: node ``--node-rank 0`` hosts it at ``--main-address:--main-port``. On one node
  without ``--main-port`` the kernel picks a free port; on several nodes the port defaults to 29500. On a
  loopback address (the default) the store listens on that address only.
- Signals: SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 are passed on to the workers (which save and stop
  when they watch for preemption); ``run`` then exits with 128 + the signal's number.
- ``--max-restarts N`` (default 0): when a worker fails, torch's elastic agent stops the others and starts
  them all again, up to N times; each new attempt sees ``TORCHELASTIC_RESTART_COUNT`` 1, 2, ... (a Trainer
  ``fit`` then resumes from its last complete checkpoint). The job fails once the restarts are used up.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.errors import ConfigurationError, choices
from torchloom.fabric.connector import CLI_USED_ENV, DEVICE_FORMS, ENV_VARS

__all__ = ["RunPlan", "build_parser", "launch", "main", "plan_run", "script_strategies"]

_SELF_LAUNCHING = ("spawn", "fork", "notebook")  # start methods whose strategies start their own workers
DEFAULT_MULTI_NODE_PORT = 29500  # torchrun's default
_STORE_TIMEOUT = datetime.timedelta(seconds=600)  # torch's static rendezvous default


@dataclass(frozen=True)
class RunPlan:
    """What ``run`` will do: the variables it exports and the ``torch.distributed.run`` arguments."""

    nproc_per_node: int
    env: dict[str, str] = field(default_factory=dict)
    torchrun_args: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchloom",
        description="torchloom command line. `torchloom run` launches a script that uses torchloom.fabric.Fabric "
        "on the given devices and nodes.",
    )
    from torchloom.fabric import __version__

    parser.add_argument("--version", action="version", version=f"torchloom-fabric {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="launch a Fabric script on N devices and nodes (through torch.distributed.run)",
        description="Launch SCRIPT as one process per device on this node, through torch.distributed.run. "
        "The options are exported as TORCHLOOM_* environment variables and win over the values passed to "
        "Fabric(...) in the script; a conflict is printed. Options go before SCRIPT: everything after "
        "SCRIPT is passed to the script.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchloom run --accelerator cpu --devices 2 train.py --lr 0.1\n\n"
        "Two nodes: run the same command on each with --num-nodes 2 --node-rank 0 (resp. 1) "
        "--main-address <node 0's address> --main-port <a free port on node 0>.",
    )
    run.add_argument("script", metavar="SCRIPT", help="path of the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="SCRIPT_ARGS", help="arguments for SCRIPT")
    run.add_argument(
        "--accelerator",
        help="device type: 'auto', 'cpu', 'cuda', 'gpu', 'mps' or another registered accelerator "
        "(default: the script's choice; processes are counted with the one 'auto' picks here)",
    )
    run.add_argument(
        "--strategy",
        help="a strategy that runs as one process per device, such as 'auto', 'ddp', 'single_device' or any "
        "registered one started from a script; not ddp_spawn/ddp_fork/ddp_notebook or XLA strategies, which "
        "start their own processes (default: the script's choice)",
    )
    run.add_argument(
        "--devices",
        default="auto",
        help=f"devices (= processes) per node: {DEVICE_FORMS}; on the CPU a process count (default: auto)",
    )
    run.add_argument("--num-nodes", type=int, default=1, help="number of nodes (machines) in the job (default: 1)")
    run.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 .. num-nodes - 1 (default: 0)")
    run.add_argument(
        "--main-address", default="127.0.0.1", help="address of node 0, which hosts the rendezvous (default: 127.0.0.1)"
    )
    run.add_argument(
        "--main-port",
        type=int,
        help=f"port on node 0 for the rendezvous (default: a free port on one node, {DEFAULT_MULTI_NODE_PORT} on several)",
    )
    run.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="times to restart all the workers of this node after one fails, an int >= 0; a restarted Trainer.fit "
        "resumes from its last checkpoint (default: 0, the first failure ends the job)",
    )
    run.add_argument(
        "--precision",
        help="numeric precision: '32-true', 'bf16-mixed', '16-mixed', '64-true', 'bf16-true', '16-true' or a "
        "legacy spelling 32, 16, bf16, 64 (default: the script's choice)",
    )
    consolidate = commands.add_parser(
        "consolidate",
        help="turn a sharded checkpoint directory into one file that torch.load(weights_only=True) reads",
        description="Read the sharded checkpoint CHECKPOINT_DIR (saved with state_dict_type='sharded', or by "
        "DeepSpeed's ZeRO stages, by any number of ranks) in this one process and write it as the single file "
        "OUTPUT_FILE, with full tensors and the structure of a full save (DeepSpeed: float32 weights, without its "
        "partitioned optimizer state). Needs memory for the whole checkpoint; no process group.",
    )
    consolidate.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="the sharded checkpoint directory")
    consolidate.add_argument("output_file", metavar="OUTPUT_FILE", help="the file to write")
    consolidate.add_argument("--overwrite", action="store_true", help="replace OUTPUT_FILE if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchloom`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "consolidate":
        return _consolidate(args)
    try:
        plan = plan_run(args)
    except ConfigurationError as error:
        print(f"torchloom run: error: {error}", file=sys.stderr)
        return 2
    return launch(plan)


def _consolidate(args: argparse.Namespace) -> int:
    from torchloom.core.checkpoint.consolidate import consolidate

    try:
        written = consolidate(args.checkpoint_dir, args.output_file, overwrite=args.overwrite)
    except ConfigurationError as error:
        print(f"torchloom consolidate: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {written}")
    return 0


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Validates the ``run`` options and decides what to export and launch; starts nothing."""
    _check_layout(args)
    accelerator = _check_accelerator(args.accelerator)
    nproc, devices = _count_processes(accelerator, args.devices)
    env = {CLI_USED_ENV: "1", ENV_VARS["devices"]: devices, ENV_VARS["num_nodes"]: str(args.num_nodes)}
    if args.accelerator is not None:
        env[ENV_VARS["accelerator"]] = args.accelerator.lower()
    if args.strategy is not None:
        env[ENV_VARS["strategy"]] = _check_strategy(args.strategy)
    if args.precision is not None:
        env[ENV_VARS["precision"]] = _check_precision(args.precision)
    torchrun_args = [
        f"--nnodes={args.num_nodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.main_address}",
        "--rdzv-backend=static",
        f"--max-restarts={args.max_restarts}",
    ]
    port = args.main_port if args.main_port is not None or args.num_nodes == 1 else DEFAULT_MULTI_NODE_PORT
    if port is not None:
        torchrun_args.append(f"--master-port={port}")
    return RunPlan(nproc, env, [*torchrun_args, args.script, *args.script_args])


def launch(plan: RunPlan) -> int:
    """Exports ``plan.env`` and runs the job in this process with ``torch.distributed.run``; the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from torchloom.core.launchers.subprocess_script import SIGNALS_TO_FORWARD, signal_exit, worker_failed_error
    from torchloom.core.rendezvous import host_agent_store

    os.environ.update(plan.env)
    args = get_args_parser().parse_args(plan.torchrun_args)
    args.signals_to_handle = SIGNALS_TO_FORWARD  # read where torch has the option (2.13; not 2.9)
    if args.node_rank == 0:  # a loopback-only store for the agent (torch's own listens on every interface)
        store = host_agent_store(args.master_addr, args.master_port or 0, _STORE_TIMEOUT)
        if store is not None and args.master_port is None:
            args.master_port = store.port  # the kernel's free port, already held: no race with other jobs
    try:
        run(args)  # type: ignore[no-untyped-call]
    except SignalException as signalled:
        # torch's rule (torch 2.9 has no such option: its agent always waits 30 s)
        grace = getattr(args, "shutdown_timeout", None) or int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        return signal_exit(signalled.sigval, grace)
    except ChildFailedError as error:
        failed = worker_failed_error(error)  # the worker that failed first, its traceback, then the others
        print(f"torchloom run: error: {failed}", file=sys.stderr)
        exitcode = failed.exitcode or 1
        return 128 - exitcode if exitcode < 0 else exitcode  # killed by a signal: the shell's 128 + signal number
    return 0


def script_strategies() -> list[str]:
    """The registered strategy names the CLI accepts: those that run as one process started per device."""
    from torchloom.core.registry import STRATEGIES

    return ["auto", *(name for name in STRATEGIES.names() if _is_script_launched(name))]


def _is_script_launched(name: str) -> bool:
    from torchloom.core.registry import STRATEGIES

    factory = STRATEGIES.factory(name)
    if getattr(factory, "uses_xla", False) is True:
        return False
    start_method = STRATEGIES.init_params(name).get("start_method")
    if start_method is None:
        try:
            parameter = inspect.signature(factory).parameters.get("start_method")
        except (TypeError, ValueError):
            parameter = None
        start_method = None if parameter is None else parameter.default
    return start_method not in _SELF_LAUNCHING


def _check_layout(args: argparse.Namespace) -> None:
    if args.num_nodes < 1:
        raise ConfigurationError(f"--num-nodes {args.num_nodes} is not valid. Valid: a positive int such as 1 or 2.")
    if not 0 <= args.node_rank < args.num_nodes:
        raise ConfigurationError(
            f"--node-rank {args.node_rank} is not valid with --num-nodes {args.num_nodes}. "
            f"Valid: {_node_ranks(args.num_nodes)}."
        )
    if args.max_restarts < 0:
        raise ConfigurationError(
            f"--max-restarts {args.max_restarts} is not valid. Valid: an int >= 0 such as 0 (no restart) or 3."
        )
    if args.main_port is not None and not 1 <= args.main_port <= 65535:
        raise ConfigurationError(f"--main-port {args.main_port} is not valid. Valid: a TCP port from 1 to 65535.")
    if not os.path.isfile(args.script):
        raise ConfigurationError(f"SCRIPT {args.script!r} is not a file. Valid: the path of a Python script.")


def _node_ranks(num_nodes: int) -> str:
    """The valid ``--node-rank`` values, listed when few (a billion nodes must not build a billion-item message)."""
    if num_nodes <= 8:
        return choices(range(num_nodes))
    return f"an int from 0 to {num_nodes - 1}"


def _check_accelerator(accelerator: str | None) -> str:
    """The accelerator name that counts the processes: the one given, or the one 'auto' picks here."""
    from torchloom.core.connector import AUTO_ACCELERATOR_ORDER
    from torchloom.core.registry import ACCELERATORS

    valid = ["auto", "gpu", *(name for name in ACCELERATORS.names() if name != "tpu")]
    name = "auto" if accelerator is None else accelerator.lower()
    if name == "tpu":
        raise ConfigurationError(
            "--accelerator 'tpu' is not supported by `torchloom run`: torch-xla starts the TPU processes itself. "
            f"Run the script with plain `python` instead, or choose one of {choices(valid)}."
        )
    if name not in valid:
        raise ConfigurationError(f"--accelerator {accelerator!r} is not valid. Valid: {choices(valid)}.")
    if name in ("auto", "gpu"):
        order = AUTO_ACCELERATOR_ORDER if name == "auto" else ("mps", "cuda")
        found = next((n for n in order if n != "tpu" and _accelerator(n).is_available()), None)
        if found is None:
            raise ConfigurationError(f"--accelerator {name!r} found no GPU on this machine. Valid: {choices(valid)}.")
        return str(found)
    if not _accelerator(name).is_available():
        available = [n for n in valid[2:] if _accelerator(n).is_available()]
        raise ConfigurationError(
            f"--accelerator {name!r} is not available on this machine. Available: {choices(['auto', *available])}."
        )
    return name


def _accelerator(name: str) -> Accelerator:
    from torchloom.core.registry import ACCELERATORS

    accelerator = ACCELERATORS.get(name)
    if not isinstance(accelerator, Accelerator):
        raise ConfigurationError(
            f"The accelerator name {name!r} is registered with {accelerator!r}, not an Accelerator."
        )
    return accelerator


def _count_processes(accelerator: str, devices: str) -> tuple[int, str]:
    """How many processes this node starts, and the devices value the workers get (resolved, not 'auto')."""
    from torchloom.core.accelerators.accelerator import normalize_device_spec

    try:
        parsed = _accelerator(accelerator).parse_devices(devices)
    except ConfigurationError as error:  # it names the accepted forms
        raise ConfigurationError(f"--devices: {error}") from None
    spec = normalize_device_spec(devices, accelerator, DEVICE_FORMS)
    if isinstance(spec, list):
        return len(parsed), ",".join(str(index) for index in spec) + ("," if len(spec) == 1 else "")
    return len(parsed), str(len(parsed))


def _check_precision(precision: str) -> str:
    from torchloom.core.connector_rules import precision_name

    try:
        return precision_name(precision)
    except ConfigurationError as error:  # it lists the valid names
        raise ConfigurationError(f"--precision: {error}") from None


def _check_strategy(strategy: str) -> str:
    from torchloom.core.registry import STRATEGIES

    name = strategy.lower()
    valid = script_strategies()
    if name != "auto" and name not in STRATEGIES:
        raise ConfigurationError(f"--strategy {strategy!r} is not valid. Valid: {choices(valid)}.")
    if name not in valid:
        raise ConfigurationError(
            f"--strategy {strategy!r} starts its own worker processes, which `torchloom run` does already. "
            f"Valid with the CLI: {choices(valid)}; or run the script with plain `python` to use {strategy!r}."
        )
    return name


if __name__ == "__main__":
    sys.exit(main())
