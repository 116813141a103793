"""Developer and CI sessions. `nox -l` lists them; `nox -t ci` is what CI runs (see README).

Virtualenvs are made with uv: with its cache, a second venv with torch costs about a second.
Every environment pins torch (TORCH_SPEC, default torch==2.13.0, the CPU build on these machines)
and installs numpy beside it (without numpy every `import torch` warns).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = os.environ.get("TORCH_SPEC", "torch==2.13.0")
BASE = [TORCH, "numpy"]
TEST_TOOLS = ["pytest", "pytest-timeout", "hypothesis", "scikit-learn", "rich"]
# Linters are pinned: a new release with new rules must not fail CI on unchanged code.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
PRODUCTS = ["core", "fabric", "trainer", "integration", "faults"]  # faults: the fault-injection suite (issue 8)
# The cpu leg is what CI runs; the cuda and tpu legs select tests by marker and skip them, saying
# why, on a machine without the device.
LEGS = [
    nox.param("cpu", id="cpu", tags=["ci", "cpu"]),
    nox.param("cuda", id="cuda", tags=["cuda"]),
    nox.param("tpu", id="tpu", tags=["tpu"]),
]

# Machines that set PYTHONDONTWRITEBYTECODE (CI's does) recompile torch from source in every process:
# `import torch` took 5.5 s instead of 2.0 s, and the tests start hundreds of processes (the integration
# session ran in 301 s instead of 133 s). Bytecode goes to the venvs and to gitignored __pycache__ folders.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
if Path("/opt/wheels").is_dir():  # the local CPU torch wheel; never fall back to a multi-GB CUDA build
    os.environ.setdefault("UV_FIND_LINKS", "/opt/wheels")


def _install_packages(session: nox.Session, *, editable: bool = True, extras: str = "") -> None:
    flag = ["-e"] if editable else []
    session.install(*BASE)
    for name in ("core", "fabric", "trainer"):
        suffix = f"[{extras}]" if extras and name == "core" else ""
        session.install(*flag, f"{ROOT / 'packages' / name}{suffix}")


@nox.session
@nox.parametrize("accelerator", LEGS)
@nox.parametrize("product", PRODUCTS, ids=PRODUCTS)
def tests(session: nox.Session, product: str, accelerator: str) -> None:
    """Run one product's tests on one accelerator leg (cuda/tpu legs skip cleanly without the device)."""
    # the fault suite fuzzes every registered strategy's arguments, DeepSpeed's included
    _install_packages(session, extras="tensorboard,deepspeed" if product == "faults" else "tensorboard")
    session.install(*TEST_TOOLS)
    env = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    # Exit code 5 (nothing collected) is fine on a device leg: that product has no tests for the device yet.
    ok = [0] if accelerator == "cpu" else [0, 5]
    session.run(
        "python",
        "-m",
        "pytest",
        f"tests/{product}",
        f"--accelerator={accelerator}",
        *session.posargs,
        env=env,
        success_codes=ok,
    )


@nox.session(tags=["ci"])
def deepspeed(session: nox.Session) -> None:
    """DeepSpeed (ZeRO 1/2/3, offload, zero.Init, checkpoints) through Fabric and the Trainer on 2 CPU processes.

    DeepSpeed installs as pure Python and torchloom's default path makes it compile no C++ op
    (see torchloom.core.strategies.deepspeed_config); a test proves the extensions folder stays empty.
    On a GPU machine `nox -s deepspeed -- --accelerator cuda` runs the fp16/bf16 GPU test instead.
    """
    _install_packages(session, extras="deepspeed")
    session.install(*TEST_TOOLS)
    env = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "DS_ACCELERATOR": "cpu"}
    session.run("python", "-m", "pytest", "tests/deepspeed", *session.posargs, env=env)


# torch-xla 2.9 (the newest) imports only with torch 2.9, so it gets its own environment (a 3.9 GB download:
# PyPI's torch 2.9 is the CUDA build); core's `xla` extra pins the pair.
@nox.session(tags=["ci", "tpu"])  # measured: 2.4 min with uv's cache, about 4 min with the download
def xla(session: nox.Session) -> None:
    """XLA on the CPU (PJRT_DEVICE=CPU): tests/xla in a torch 2.9 + torch-xla 2.9 venv, then tests/core on torch 2.9.

    Single device through Fabric and the Trainer, SPMD over 2 and 4 CPU devices (FSDPv2, sharded data, DCP
    checkpoints), the multi-replica plumbing with fakes. Tests that need several XLA replicas with collectives
    (XLA on the CPU hangs in them, pytorch/xla#9089) run only on a TPU host (PJRT_DEVICE=TPU).
    """
    session.install("numpy", *TEST_TOOLS)
    session.install(f"-e{ROOT / 'packages' / 'core'}[xla,tensorboard]", "-e", str(ROOT / "packages" / "fabric"))
    session.install("-e", str(ROOT / "packages" / "trainer"))
    env = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    session.run(
        "python", "-m", "pytest", "tests/xla", "--accelerator=tpu", *session.posargs, env={**env, "PJRT_DEVICE": "CPU"}
    )
    # the error tests and the faked multi-replica plumbing, then core on torch 2.9; no XLA device asked for.
    # Separate runs: tests/core's warning checks expect a process of their own, as in the other sessions.
    session.run("python", "-m", "pytest", "tests/xla", *session.posargs, env=env)
    session.run("python", "-m", "pytest", "tests/core", *session.posargs, env=env)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def typecheck(session: nox.Session) -> None:
    """mypy: strict for torchloom.core, checked defs for the products."""
    _install_packages(session, extras="tensorboard")
    # optional packages imported lazily by the code: installed so mypy checks those calls too
    session.install(MYPY, "pytest", "hypothesis", "rich")
    session.run("mypy", "-p", "torchloom.core", "-p", "torchloom.fabric", "-p", "torchloom.trainer")


@nox.session(tags=["ci"])
def build(session: nox.Session) -> None:
    """Build the three wheels with hatch, then install each product alone (with core) in a fresh venv and import it."""
    session.install("hatch")
    dist = ROOT / "dist"
    # hatch installs hatchling into its own build environment with uv; nox's UV_PYTHON would send it
    # into this session's venv instead, so drop it. A private data dir keeps stale envs out.
    hatch_env = {
        "HATCH_DATA_DIR": str(Path(session.create_tmp()).resolve() / "hatch"),
        "UV_PYTHON": None,
        "UV_PROJECT_ENVIRONMENT": None,
    }
    for name in ("core", "fabric", "trainer"):
        with session.chdir(ROOT / "packages" / name):
            session.run("hatch", "build", "-t", "wheel", str(dist), env=hatch_env)
    for product, other in (("fabric", "trainer"), ("trainer", "fabric")):
        venv = Path(session.create_tmp()) / f"only-{product}"
        session.run("uv", "venv", "-q", "--clear", str(venv))
        python = str(venv / "bin" / "python")
        wheels = [str(next(dist.glob(f"torchloom_{n}-*.whl"))) for n in ("core", product)]
        session.run("uv", "pip", "install", "-q", "--python", python, *BASE, *wheels)
        check = (
            f"import importlib.util; import torchloom.{product}; from torchloom.core import Connector, DDPStrategy; "
            f"assert importlib.util.find_spec('torchloom.{other}') is None, 'torchloom.{other} must not be installed'; "
            f"print('torchloom.{product} imports without torchloom.{other}')"
        )
        session.run(python, "-c", check, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: the digits classifier trained with DDP on 2 CPU processes, by Fabric, then by the Trainer.

    docs/examples/fabric/train_digits.py is a plain loop with the Fabric lines; docs/examples/trainer/train_digits.py
    is a LoomModule + LoomDataModule fitted by the Trainer (checkpointing, early stopping, a final test). Each
    prints its accuracy, where its checkpoints and logs went, and the `tensorboard` command to view them.
    Arguments after `--` go to both scripts; use the options they share (`nox -s demo -- --precision bf16-mixed`;
    also --accelerator, --strategy, --devices).
    """
    _install_packages(session, extras="tensorboard")
    session.install("scikit-learn")
    env = {"OMP_NUM_THREADS": "1"}
    for product in ("fabric", "trainer"):
        session.log(f"the {product} example: docs/examples/{product}/train_digits.py")
        session.run("python", f"docs/examples/{product}/train_digits.py", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite (issue 5): torchloom against plain PyTorch, measured side by side.

    Sections: step overhead (one process and 2-rank DDP), import time, time to first step of a 2-rank
    launch, peak memory per rank (and DDP vs FSDP), and the CUDA comparisons where there is a GPU.
    Prints one table with PASS/FAIL against the targets and writes the same numbers to bench.json
    (`nox -s bench -- --json other.json --reps 7 --only step,ddp`). About 15 minutes on 2 CPU cores;
    slow and noisy by nature: not part of CI.
    """
    _install_packages(session)
    session.run("python", "-m", "tools.bench", *(session.posargs or ["--json", "bench.json"]))
