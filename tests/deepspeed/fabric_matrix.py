"""Two ranks (``python fabric_matrix.py OUT``, re-run as 2 workers by the popen launcher) train a small model with
Fabric under DeepSpeed, once per case of ``CASES``, in one job (starting DeepSpeed costs more than a case).

Each case, with a fresh ``Fabric`` and ``DeepSpeedStrategy`` over the same process group:

1. build the model (stage 3: in ``init_module(empty_init=True)``, so ``zero.Init`` partitions it as it is built),
   set it up with a torch AdamW; 6 steps, each accumulating 2 micro-batches (``no_backward_sync``);
2. record the eval loss before/after, and the full weights on every rank (gathered in stage 3);
3. save a checkpoint directory, take 2 more steps (losses ``after_save``), load it back into the same
   objects, take the same 2 steps again (``after_load``): equal only if weights *and* optimizer state came back;
4. rank 0 consolidates the directory into one file and compares it with the weights at save time.

Rank 0 writes ``OUT/results.json``; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torchloom.core.checkpoint import deepspeed as ds_io
from torchloom.core.checkpoint.consolidate import consolidate
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.deepspeed import DeepSpeedStrategy
from torchloom.fabric import Fabric

# (name, strategy arguments, precision)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("stage1-32", {"stage": 1}, "32-true"),
    ("stage1-bf16", {"stage": 1}, "bf16-mixed"),
    ("stage2-32", {"stage": 2}, "32-true"),
    ("stage2-bf16", {"stage": 2}, "bf16-mixed"),
    ("stage3-32", {"stage": 3}, "32-true"),
    ("stage3-bf16", {"stage": 3}, "bf16-mixed"),
    ("stage2-offload", {"stage": 2, "offload_optimizer": True}, "32-true"),
    ("stage3-offload", {"stage": 3, "offload_optimizer": True, "offload_parameters": True}, "bf16-true"),
]
# on GPUs (``python fabric_matrix.py OUT cuda``): DeepSpeed's fp16 mode, which the CPU does not have
CUDA_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("stage2-fp16", {"stage": 2}, "16-mixed"),
    ("stage3-fp16", {"stage": 3}, "16-mixed"),
    ("stage3-bf16", {"stage": 3}, "bf16-mixed"),
]
STEPS, ACCUMULATE, LR = 6, 2, 0.02


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def batches(rank: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    out = []
    for _ in range(count):
        x = torch.randn(8, 6, generator=generator)
        out.append((x, 0.5 * x[:, :3].sum(dim=1, keepdim=True) - x[:, 3:].sum(dim=1, keepdim=True)))
    return out


def train_steps(fabric: Fabric, model: Any, optimizer: Any, data: list[Any]) -> list[float]:
    """One optimizer step per ``ACCUMULATE`` micro-batches; returns each step's mean loss."""
    losses = []
    for start in range(0, len(data), ACCUMULATE):
        window = data[start : start + ACCUMULATE]
        total = 0.0
        for index, (x, y) in enumerate(window):
            with fabric.no_backward_sync(model, enabled=index < len(window) - 1):
                loss = nn.functional.mse_loss(model(x).float(), y)
                fabric.backward(loss / len(window))
            total += loss.item() / len(window)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def reference_weights(steps_data: list[list[Any]]) -> dict[str, torch.Tensor]:
    """The same training in one process with plain PyTorch: each micro-batch is both ranks' batches together."""
    torch.manual_seed(7)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for start in range(0, len(steps_data[0]), ACCUMULATE):
        for index in range(start, start + ACCUMULATE):
            x = torch.cat([data[index][0] for data in steps_data])
            y = torch.cat([data[index][1] for data in steps_data])
            (nn.functional.mse_loss(model(x), y) / ACCUMULATE).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {key: value.detach() for key, value in model.state_dict().items()}


def eval_loss(model: Any, data: list[Any]) -> float:
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x).float(), y).item() for x, y in data) / len(data)


def full_weights(fabric: Fabric, model: Any) -> dict[str, torch.Tensor]:
    strategy = fabric.strategy
    return {k: v.float() for k, v in strategy.get_module_state_dict(model.forward_module).items()}


def run_case(out: Path, name: str, arguments: dict[str, Any], precision: str, accelerator: str) -> dict[str, Any]:
    strategy = DeepSpeedStrategy(**arguments)
    devices = 2 if accelerator == "cpu" else min(2, torch.cuda.device_count())
    fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
    fabric.launch()
    rank = fabric.global_rank
    fabric.seed_everything(7)
    with fabric.init_module(empty_init=strategy.stage == 3):
        model = build()
    result: dict[str, Any] = {}
    if strategy.stage == 3:
        params = list(model.parameters())
        result["partitioned"] = all(p.numel() < p.ds_numel for p in params if p.ds_numel >= 2)
        result["full_numel"] = sum(p.ds_numel for p in params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = fabric.setup(model, optimizer)
    try:
        fabric.setup(build(), torch.optim.SGD(build().parameters(), lr=0.1))
    except ConfigurationError as error:
        result["second_model_error"] = str(error)
    held_out = [fabric.to_device(batch) for batch in batches(rank, 4, seed=99)]
    result["eval_before"] = eval_loss(model, held_out)
    result["train_losses"] = train_steps(
        fabric, model, optimizer, on(fabric, batches(rank, STEPS * ACCUMULATE, seed=1))
    )
    result["eval_after"] = eval_loss(model, held_out)
    weights = full_weights(fabric, model)
    gathered = fabric.all_gather(torch.cat([w.flatten() for w in weights.values()]))
    result["rank_weight_diff"] = (gathered - gathered[0]).abs().max().item()
    if rank == 0 and fabric.world_size == 2:
        reference = reference_weights([batches(r, STEPS * ACCUMULATE, seed=1) for r in range(2)])
        result["reference_diff"] = max((weights[k] - reference[k]).abs().max().item() for k in reference)

    folder = out / name
    state = {"model": model, "optimizer": optimizer, "step": STEPS}
    fabric.save(folder, state)
    more = on(fabric, batches(rank, 2 * ACCUMULATE, seed=2))
    result["after_save"] = train_steps(fabric, model, optimizer, more)
    state = {"model": model, "optimizer": optimizer, "step": -1}
    remainder = fabric.load(folder, state)
    result["loaded_step"] = state["step"]
    result["remainder"] = sorted(remainder)
    result["after_load"] = train_steps(fabric, model, optimizer, more)
    if name == "stage2-32":
        result["failed_save"] = save_that_fails(fabric, folder, state)
    if rank == 0:
        single = out / f"{name}.pt"
        consolidate(folder, single)
        loaded = torch.load(single, weights_only=True)
        result["consolidated_keys"] = sorted(loaded)
        saved = loaded["model"]
        result["consolidated_matches"] = sorted(saved) == sorted(weights) and all(
            torch.equal(saved[key].to(dtype_of(precision)).float(), weights[key].cpu()) for key in weights
        )
    fabric.barrier()  # the process group stays for the next case; this case's engine is dropped with it
    return result


def save_that_fails(fabric: Fabric, folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 fails while finishing a save over ``folder``: every rank must raise, the old checkpoint must stay."""
    original = ds_io.write_extra

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (injected)")

    ds_io.write_extra = disk_full
    try:
        fabric.save(folder, {**state, "step": 999})
        raised = ""
    except Exception as error:
        raised = type(error).__name__
    finally:
        ds_io.write_extra = original
    kept: dict[str, Any] = {"model": state["model"], "optimizer": state["optimizer"], "step": -1}
    fabric.load(folder, kept)
    leftovers = sorted(p.name for p in folder.parent.glob(f".{folder.name}.*"))
    return {"raised": raised, "kept_step": kept["step"], "leftovers": leftovers}


def on(fabric: Fabric, data: list[Any]) -> list[Any]:
    return [fabric.to_device(batch) for batch in data]


def dtype_of(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "16-m": torch.float16}.get(precision[:4], torch.float32)


def main(out: Path, accelerator: str) -> None:
    results = {}
    for name, arguments, precision in CASES if accelerator == "cpu" else CUDA_CASES:
        results[name] = run_case(out, name, arguments, precision, accelerator)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
