"""The Trainer with DeepSpeed on two real gloo ranks (``trainer_runs.py``, one job): parity with a plain loop
under DeepSpeed's own clipping and the Trainer's accumulation, stage 3 with ``configure_model`` under
``zero.Init``, exact resume from a DeepSpeed checkpoint directory, and reading those directories back here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.deepspeed.trainer_runs import Regressor
from tests.processes import explain, run_python
from torchloom.core.checkpoint import deepspeed as ds_io
from torchloom.core.checkpoint.consolidate import consolidate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("deepspeed_trainer")
    process = run_python(Path(__file__).with_name("trainer_runs.py"), str(out), timeout=420)
    assert process.returncode == 0, explain(process)
    return out, json.loads((out / "results.json").read_text())


def test_zero_2_fit_equals_a_plain_loop_with_accumulation_and_clipping(run: tuple[Path, dict[str, Any]]) -> None:
    """gradient_clip_val reaches DeepSpeed's config (it clips by the global norm inside its step) and the Trainer's
    accumulation window is DeepSpeed's: 2 epochs x 4 batches / 2 = 4 steps, the weights of a plain loop."""
    parity = run[1]["parity"]
    assert parity["global_step"] == 4
    assert parity["reference_diff"] < 1e-6
    assert parity["unclipped_diff"] > 1e-3  # the clipping was active, so the parity covers it


def test_configure_model_under_zero_3_builds_partitioned_layers(run: tuple[Path, dict[str, Any]]) -> None:
    assert run[1]["resume"]["built_partitioned"] is True


def test_resuming_from_a_deepspeed_directory_equals_the_uninterrupted_run(run: tuple[Path, dict[str, Any]]) -> None:
    resume = run[1]["resume"]
    assert resume["resume_diff"] == 0.0
    assert resume["resumed_step"] == resume["straight_step"] == 16
    assert resume["resumed_metrics"] == resume["straight_metrics"]
    # StepLR(3) per epoch decays once in 4 epochs; a scheduler not restored would count 2 epochs from 0 (no decay)
    assert resume["lr"] == pytest.approx(0.05 * 0.5)


def test_test_after_fit_reuses_the_engine(run: tuple[Path, dict[str, Any]]) -> None:
    resume = run[1]["resume"]
    assert resume["test_loss"] == pytest.approx(resume["straight_metrics"]["val_loss"])


def test_checkpoint_directories_are_deepspeeds_with_torchloom_state_beside(run: tuple[Path, dict[str, Any]]) -> None:
    folder = run[0] / "straight" / "epoch=3.ckpt"
    assert ds_io.is_deepspeed_checkpoint(folder)
    assert (folder / "latest").read_text().strip() == ds_io.TAG
    ranks = sorted(p.name for p in (folder / ds_io.TAG).glob("*_optim_states.pt"))
    assert len(ranks) == 2  # one optimizer partition per rank
    extra = ds_io.read_extra(folder)
    assert extra["entries"] == {"state_dict": "module", "optimizer_states": ["optimizer"]}
    assert extra["state"]["global_step"] == 16 and "loops" in extra["state"] and "lr_schedulers" in extra["state"]


def test_load_from_checkpoint_and_consolidate_read_the_directory_here(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = run[0]
    folder = out / "straight" / "epoch=3.ckpt"
    live = torch.load(out / "straight_weights.pt", weights_only=True)  # bf16 module weights, as floats
    module = Regressor.load_from_checkpoint(folder)
    assert module.hparams["scheduler"] is True
    loaded = {k.removeprefix("layers."): v for k, v in module.state_dict().items()}
    assert sorted(loaded) == sorted(live)
    for key, value in live.items():  # the float32 master weights, which the bf16 module weights round
        assert torch.equal(loaded[key].to(torch.bfloat16).float(), value)
    single = consolidate(folder, tmp_path / "one.ckpt")
    checkpoint = torch.load(single, weights_only=True)
    assert checkpoint["global_step"] == 16 and "optimizer_states" not in checkpoint
    assert torch.equal(checkpoint["state_dict"]["layers.0.weight"], module.layers[0].weight.detach())
