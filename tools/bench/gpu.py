"""The GPU benchmarks: the step-overhead comparisons on CUDA in bf16-mixed, and tokens/s of a small GPT.

Without a CUDA device this prints "skipped: no CUDA device" and gives no rows. With one:

- step overhead (``step_overhead.py``'s workloads and training code) in bf16-mixed on ``cuda:0``, and as 2-rank
  DDP over nccl where there are 2 GPUs, against the same targets as on the CPU;
- tokens/s of a GPT-style model (token and position embeddings, pre-norm ``nn.TransformerEncoderLayer`` blocks
  with a causal mask, vocabulary 8k, sequence 256) trained with AdamW under DDP and FSDP, plain PyTorch against
  Fabric, every job under torchrun on ``min(2, GPUs)`` ranks. Plain DDP uses bf16 autocast; plain FSDP
  ``fully_shard`` per block with a bf16 ``MixedPrecisionPolicy`` (float32 gradient reduction); Fabric gets
  ``precision="bf16-mixed"``. The step clock synchronises the GPU at each batch start. "info" rows: the issue
  gives no target for throughput.

A GPT job (``python -m tools.bench.gpu JOB.json``) trains each of its ``configs`` in turn; the benchmark gives each
job one variant (a fresh process per variant), the tests run all of them in one job on the CPU.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.common import Job, Row, fsdp_available, load_job, rank, ratio_rows, run_job, write_report
from tools.bench.step_overhead import SEED, StepClock, measure_steps, plain_process

__all__ = ["GPT", "GPT_VARIANTS", "build_gpt", "gpt_rows", "run_gpu"]

GPT = {"vocab": 8192, "seq": 256, "dim": 512, "layers": 4, "heads": 8, "batch_size": 8}
GPT_VARIANTS = ("plain-ddp", "fabric-ddp", "plain-fsdp", "fabric-fsdp")
PRECISION = "bf16-mixed"


def run_gpu(repetitions: int, quick: bool) -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device", flush=True)
        return []
    world_size = min(2, torch.cuda.device_count())
    rows = measure_steps("gpu step", repetitions, quick, device="cuda", precisions=(PRECISION,))
    if world_size > 1:
        kind = f"gpu ddp x{world_size} step"
        rows += measure_steps(kind, repetitions, quick, world_size=world_size, device="cuda", precisions=(PRECISION,))
    else:
        print("gpu: DDP step overhead skipped: it needs 2 CUDA devices, this machine has 1", flush=True)
    return rows + gpt_rows(repetitions, quick, world_size, "cuda")


def gpt_rows(
    repetitions: int, quick: bool, world_size: int, device: str, sizes: dict[str, int] | None = None
) -> list[Row]:
    """Interleaved GPT jobs, one variant each; per strategy, Fabric's step time as a ratio to plain PyTorch's."""
    sizes = sizes or GPT
    variants = [v for v in GPT_VARIANTS if v != "fabric-fsdp" or fsdp_available()]
    if "fabric-fsdp" not in variants:
        print("gpu: Fabric FSDP skipped: FSDP not available yet", flush=True)
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(repetitions):
            for variant in variants:
                config = {"variant": variant, "steps": 3 if quick else 50}
                out = str(Path(scratch, f"{variant}-{rep}"))
                job = Job("gpt", [config], 2 if quick else 10, out, world_size, device, extra=dict(sizes))
                seconds[variant] += run_job(job, "tools.bench.gpu", torchrun=True)[0]["results"][0]["wall"]
    tokens_per_step = sizes["batch_size"] * sizes["seq"] * world_size
    rows = []
    for strategy in ("ddp", "fsdp"):
        named = {f"gpt {v.replace('-', ' ')} x{world_size}": seconds[v] for v in variants if v.endswith(strategy)}
        for row in ratio_rows("gpu tokens", named, f"gpt plain {strategy} x{world_size}", {}):
            row.tokens_per_s = tokens_per_step / row.median
            rows.append(row)
    return rows


def build_gpt(vocab: int, seq: int, dim: int, layers: int, heads: int) -> Any:
    import torch
    from torch import nn

    class GPT(nn.Module):
        causal: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.position = nn.Embedding(seq, dim)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(layers)
            )
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            # a bool mask (True = hidden) works whatever dtype the attention computes in
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            length = tokens.shape[1]
            x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
            for block in self.blocks:
                x = block(x, src_mask=self.causal[:length, :length], is_causal=True)
            return self.head(self.norm(x))  # type: ignore[no-any-return]

    return GPT()


def _train_gpt(variant: str, batches: int, clock: StepClock, job: Job) -> None:
    import torch
    import torch.nn.functional as F

    library, strategy = variant.split("-")
    sizes = job.extra
    model_sizes = {name: sizes[name] for name in ("vocab", "seq", "dim", "layers", "heads")}
    autocast = False
    backward: Any = None
    optimizer: Any
    if library == "plain":
        device = plain_process(job.device, distributed=True)
        torch.manual_seed(SEED)
        model = build_gpt(**model_sizes).to(device)
        if strategy == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            autocast = True
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.blocks:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    else:
        from torchloom.core.registry import STRATEGIES
        from torchloom.fabric import Fabric

        chosen: Any = strategy
        if strategy == "fsdp":  # one unit per block, as in the plain reference
            chosen = STRATEGIES.get("fsdp", auto_wrap_policy={torch.nn.TransformerEncoderLayer})
        fabric = Fabric(accelerator=job.device, strategy=chosen, devices=job.world_size, precision=PRECISION)
        fabric.launch()
        device = fabric.device
        torch.manual_seed(SEED)
        model = fabric.setup_module(build_gpt(**model_sizes))
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=3e-4))
        backward = fabric.backward
    generator = torch.Generator().manual_seed(SEED + rank())
    shape = (batches, sizes["batch_size"], sizes["seq"] + 1)
    data = torch.randint(0, sizes["vocab"], shape, generator=generator).to(device)
    model.train()
    for tokens in data:
        clock.tick()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        if backward is None:
            loss.backward()  # type: ignore[no-untyped-call]
        else:
            backward(loss)
        optimizer.step()


def gpt_child(job_path: str) -> None:
    """One rank of a GPT job: each config trained in turn; writes its step times."""
    import torch

    job = load_job(job_path)
    results = []
    for config in job.configs:
        clock = StepClock(job.device)
        _train_gpt(config["variant"], job.warmup + config["steps"] + 1, clock, job)
        results.append({"variant": config["variant"], **clock.steps(job.warmup)})
    if torch.distributed.is_initialized():
        gc.collect()  # DDP/FSDP wrappers sit in reference cycles; freed at exit, their group's destructor can abort
        torch.distributed.destroy_process_group()
    write_report(job, {"results": results})


if __name__ == "__main__":
    gpt_child(sys.argv[1])
