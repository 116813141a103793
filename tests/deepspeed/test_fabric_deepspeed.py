"""Fabric with DeepSpeed on two real gloo ranks: ZeRO 1/2/3 x (32-true, bf16), offload, zero.Init, checkpoints.

``fabric_matrix.py`` runs every case in one two-rank job; each test asserts one claim on its results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deepspeed.fabric_matrix import CASES
from tests.processes import explain, job_env, run_python

pytestmark = pytest.mark.slow

NAMES = [name for name, _, _ in CASES]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("deepspeed_fabric")
    extensions = out / "torch_extensions"  # where DeepSpeed would put any op it compiles
    env = job_env(TORCH_EXTENSIONS_DIR=str(extensions))
    process = run_python(Path(__file__).with_name("fabric_matrix.py"), str(out), timeout=420, env=env)
    assert process.returncode == 0, explain(process)
    loaded: dict[str, Any] = json.loads((out / "results.json").read_text())
    loaded["compiled"] = (
        sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*")) if extensions.exists() else []
    )
    return loaded


def test_no_deepspeed_op_is_compiled(results: dict[str, Any]) -> None:
    """Every case (offload included) ran without DeepSpeed building a C++ op: no silent minute of g++."""
    assert results["compiled"] == []


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_the_loss_and_ranks_hold_the_same_weights(results: dict[str, Any], name: str) -> None:
    case = results[name]
    assert case["eval_after"] < 0.5 * case["eval_before"], case
    assert case["rank_weight_diff"] == 0.0


@pytest.mark.parametrize("name", [n for n, _, precision in CASES if precision == "32-true"])
def test_float32_zero_training_equals_plain_pytorch_on_the_whole_batch(results: dict[str, Any], name: str) -> None:
    """Partitioned optimizer state, gradients and parameters, accumulation over two micro-batches and offload
    change nothing in float32: the weights are a plain single-process AdamW loop's."""
    assert results[name]["reference_diff"] < 1e-6


@pytest.mark.parametrize("name", [n for n, _, precision in CASES if precision == "bf16-mixed" and "stage3" not in n])
def test_bf16_training_stays_close_to_plain_float32(results: dict[str, Any], name: str) -> None:
    assert results[name]["reference_diff"] < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_round_trip_resumes_with_identical_losses(results: dict[str, Any], name: str) -> None:
    """Two steps after the save, then load and the same two steps: equal only if the weights and Adam's moments
    (partitioned per rank in DeepSpeed's files) came back; the plain entry comes from torchloom's extra file."""
    case = results[name]
    assert case["after_load"] == case["after_save"]
    assert case["loaded_step"] == 6
    assert case["remainder"] == []


def test_a_save_that_fails_on_rank_0_raises_everywhere_and_keeps_the_previous_checkpoint(
    results: dict[str, Any],
) -> None:
    """The new save is staged next to the old one: rank 0 failing to finish it (injected "disk full") makes every
    rank raise instead of waiting, and the directory still holds the previous save, which loads."""
    failed = results["stage2-32"]["failed_save"]
    assert failed["raised"] in ("OSError", "RuntimeError")  # rank 0 re-raises its own; the others say it failed
    assert failed["kept_step"] == 6
    assert failed["leftovers"] == []  # no staging folder left behind


@pytest.mark.parametrize("name", NAMES)
def test_the_consolidated_file_equals_the_live_weights(results: dict[str, Any], name: str) -> None:
    case = results[name]
    # the optimizer stays in DeepSpeed's partitions; the version Fabric.save records comes along
    assert case["consolidated_keys"] == ["model", "step", "torchloom_version"]
    assert case["consolidated_matches"] is True


@pytest.mark.parametrize("name", [n for n in NAMES if "stage3" in n])
def test_stage_3_init_module_partitions_the_model_as_it_is_built(results: dict[str, Any], name: str) -> None:
    assert results[name]["partitioned"] is True
    assert results[name]["full_numel"] == 6 * 32 + 32 + 32 * 32 + 32 + 32 + 1


@pytest.mark.cuda
def test_fp16_and_bf16_on_gpus(tmp_path: Path) -> None:
    """DeepSpeed's fp16 mode (dynamic loss scaling) on 1-2 GPUs over nccl: trains, round-trips, consolidates."""
    process = run_python(Path(__file__).with_name("fabric_matrix.py"), str(tmp_path), "cuda", timeout=600)
    assert process.returncode == 0, explain(process)
    results = json.loads((tmp_path / "results.json").read_text())
    for case in results.values():  # fp16 skips its first steps while the loss scale settles: only "lower"
        assert case["eval_after"] < case["eval_before"], case
        assert case["rank_weight_diff"] == 0.0
        assert case["after_load"] == case["after_save"]
        assert case["consolidated_matches"] is True


def test_a_second_model_on_the_same_strategy_is_refused(results: dict[str, Any]) -> None:
    message = results["stage1-32"]["second_model_error"]
    assert "one model per run" in message and "one nn.Module" in message
