"""The same FSDPStrategy type through Fabric and through the Trainer: same model, data and seed, same weights.

Each product runs as a subprocess (2 forked gloo ranks) and saves a full checkpoint; both are compared with
each other and with plain single-process PyTorch on the whole batch (what 2-rank data parallelism computes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.processes import explain, run_python

from .helpers import sharded_products

HELPER = Path(__file__).parent / "helpers" / "sharded_products.py"

pytestmark = pytest.mark.slow


def _reference() -> dict[str, torch.Tensor]:
    model, loader = sharded_products.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    batches = list(loader)
    for step in range(sharded_products.STEPS):  # together the 2 ranks' step s sees samples 16s..16s+15 (interleaved)
        first, second = batches[2 * step], batches[2 * step + 1]
        inputs = torch.cat([first[0], second[0]])
        labels = torch.cat([first[1], second[1]])
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return {key: value.detach() for key, value in model.state_dict().items()}


def test_fabric_and_trainer_train_the_same_weights_with_fsdp(tmp_path: Path) -> None:
    weights = {}
    for product in ("fabric", "trainer"):
        out = tmp_path / f"{product}.ckpt"
        process = run_python(HELPER, product, str(out), timeout=240)
        assert process.returncode == 0, explain(process)
        checkpoint = torch.load(out, weights_only=True)
        weights[product] = checkpoint["model"] if product == "fabric" else checkpoint["state_dict"]
    trainer_weights = {key.removeprefix("network."): value for key, value in weights["trainer"].items()}
    assert set(weights["fabric"]) == set(trainer_weights)
    for key, value in weights["fabric"].items():
        torch.testing.assert_close(value, trainer_weights[key], rtol=0, atol=1e-6, msg=key)
    for key, value in _reference().items():
        torch.testing.assert_close(weights["fabric"][key], value, rtol=1e-5, atol=1e-5, msg=key)
