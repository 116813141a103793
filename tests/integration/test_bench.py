"""The benchmark suite runs end to end on its tiny configuration (no timing assertions: these machines are noisy).

The GPU section is checked here without a GPU in three ways: the quick run prints its skip, its plan (which jobs,
on which device, how many ranks, how tokens/s is computed) with the CUDA queries patched, and its GPT jobs trained
for real on the CPU over gloo. The real-device run is the ``cuda``-marked test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from tools.bench import gpu
from tools.bench.__main__ import build_parser
from tools.bench.common import Job, fsdp_available, run_command, run_job

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT = {"vocab": 64, "seq": 16, "dim": 32, "layers": 2, "heads": 2, "batch_size": 2}


def _run_bench(tmp_path: Path, *args: str) -> tuple[dict[tuple[str, str], dict[str, Any]], str]:
    """``python -m tools.bench --quick ARGS``; its rows (checked to be well formed) and what it printed."""
    out = tmp_path / f"bench-{abs(hash(args))}.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(row["kind"], row["name"]): row for row in json.loads(out.read_text())["rows"]}
    for key, row in rows.items():
        assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, key
        assert row["median"] > 0 and row["spread"] >= 0, key
        assert row["status"] in ("PASS", "FAIL", "info"), key
        assert row["unit"] in ("s", "B"), key
        if row["kind"].endswith("step"):  # paired rounds: the spread of the per-round ratios comes with them
            assert math.isfinite(row["cpu_ratio"]) and row["ratio_spread"] >= 0, key
        assert f"{row['kind']}: {row['name']}" in done.stdout  # the table printed is the same numbers
    return rows, done.stdout


def _step_rows(kind: str, precisions: tuple[str, ...]) -> set[tuple[str, str]]:
    return {
        (kind, f"{variant} {work} {precision}")
        for variant in ("plain", "fabric", "trainer")  # the A/A repeat is left out of --quick
        for work in ("small", "large")
        for precision in precisions
    }


@pytest.mark.slow
def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    # every section, in two runs at once: the single-process sections leave the second core free meanwhile
    with ThreadPoolExecutor(2) as pool:
        halves = list(
            pool.map(lambda only: _run_bench(tmp_path, "--only", only), ["step,import,memory,gpu", "ddp,launch"])
        )
    rows = {**halves[0][0], **halves[1][0]}
    stdout = halves[0][1] + halves[1][1]
    expected = _step_rows("step", ("32-true", "bf16-mixed")) | _step_rows("ddp step", ("32-true", "bf16-mixed"))
    expected |= {("import", name) for name in ("torch", "torchloom.core", "torchloom.fabric", "torchloom.trainer")}
    expected |= {("launch", name) for name in ("torchrun plain DDP", "torchloom run fabric", "python trainer ddp")}
    expected |= {("memory", f"single {variant}") for variant in ("plain", "fabric", "trainer")}
    if fsdp_available():
        expected |= {("memory", "fabric ddp x2"), ("memory", "fabric fsdp x2")}
    else:
        assert "skipped: FSDP not available yet" in stdout
    if torch.cuda.is_available():
        assert {kind for kind, _ in rows} >= {"gpu step", "gpu tokens"}
        rows = {key: row for key, row in rows.items() if not key[0].startswith("gpu")}
    else:
        assert "skipped: no CUDA device" in stdout
    assert set(rows) == expected
    assert rows["step", "plain small 32-true"]["ratio"] == 1.0 and rows["import", "torch"]["ratio"] == 1.0
    assert (
        rows["launch", "torchrun plain DDP"]["ratio"] == 1.0 and rows["launch", "python trainer ddp"]["target"] is None
    )
    assert rows["step", "fabric small 32-true"]["target"] == 1.03
    assert rows["ddp step", "trainer large bf16-mixed"]["target"] == 1.03
    assert rows["import", "torchloom.trainer"]["target"] == 1.25
    assert rows["memory", "single fabric"]["target"] == 1.05 and rows["memory", "single fabric"]["unit"] == "B"
    assert rows["memory", "single plain"]["median"] > 2**20  # bytes, not KiB


def test_arguments_pick_sections_and_refuse_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["--only", "gpu, step", "--reps", "2"])
    assert args.only == ["step", "gpu"] and args.reps == 2  # the suite's order
    assert parser.parse_args([]).only == ["step", "import", "ddp", "launch", "memory", "gpu"]
    for bad in (["--only", "step,gpus"], ["--only", ""], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        error = capsys.readouterr().err
        assert repr(bad[1]) in error, error
    with pytest.raises(SystemExit):
        parser.parse_args(["--only", "bogus"])
    assert "'step', 'import', 'ddp', 'launch', 'memory', 'gpu'" in capsys.readouterr().err


def test_gpu_section_skips_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.run_gpu(1, quick=True) == []
    assert "skipped: no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_section_plan_with_cuda_patched(gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which jobs the GPU section starts, where and how wide, and the tokens/s it derives (the jobs are recorded)."""
    steps: list[tuple[str, dict[str, Any]]] = []
    jobs: list[tuple[Job, str, bool | None]] = []

    def record_steps(kind: str, repetitions: int, quick: bool, **options: Any) -> list[Any]:
        steps.append((kind, options))
        return []

    def record_job(job: Job, module: str = "", torchrun: bool | None = None) -> list[dict[str, Any]]:
        jobs.append((job, module, torchrun))
        seconds = 0.5 if job.configs[0]["variant"].startswith("plain") else 0.6
        return [{"rank": 0, "results": [{"variant": job.configs[0]["variant"], "wall": [seconds, seconds]}]}]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(gpu, "measure_steps", record_steps)
    monkeypatch.setattr(gpu, "run_job", record_job)
    monkeypatch.setattr(gpu, "fsdp_available", lambda: True)

    rows = gpu.run_gpu(2, quick=False)

    expected_steps: list[tuple[str, dict[str, Any]]] = [("gpu step", {"device": "cuda", "precisions": ("bf16-mixed",)})]
    if gpus == 2:
        expected_steps.append(("gpu ddp x2 step", {"world_size": 2, "device": "cuda", "precisions": ("bf16-mixed",)}))
    assert steps == expected_steps
    assert [job.configs[0]["variant"] for job, _, _ in jobs] == list(gpu.GPT_VARIANTS) * 2  # interleaved, 2 reps
    for job, module, torchrun in jobs:
        assert (job.device, job.world_size, module, torchrun) == ("cuda", gpus, "tools.bench.gpu", True)
        assert job.extra == gpu.GPT and job.configs[0]["steps"] == 50
    assert [(row.kind, row.name) for row in rows] == [
        ("gpu tokens", f"gpt {library} {strategy} x{gpus}")
        for strategy in ("ddp", "fsdp")
        for library in ("plain", "fabric")
    ]
    tokens_per_step = 8 * 256 * gpus
    assert [row.tokens_per_s for row in rows] == pytest.approx([tokens_per_step / s for s in (0.5, 0.6) * 2])
    assert [row.ratio for row in rows] == pytest.approx([1.0, 1.2, 1.0, 1.2])


@pytest.mark.slow
def test_gpt_jobs_train_on_the_cpu(tmp_path: Path) -> None:
    """The GPT training of the GPU section, every variant in one 2-rank job on the CPU (gloo), tiny sizes."""
    variants = [v for v in gpu.GPT_VARIANTS if v != "fabric-fsdp" or fsdp_available()]
    job = Job("gpt", [{"variant": v, "steps": 2} for v in variants], 1, str(tmp_path / "gpt"), 2, "cpu", extra=TINY_GPT)
    reports = run_job(job, "tools.bench.gpu", torchrun=True)
    assert [report["rank"] for report in reports] == [0, 1]
    for report in reports:
        assert [result["variant"] for result in report["results"]] == variants
        for result in report["results"]:
            assert len(result["wall"]) == 2 and all(seconds > 0 for seconds in result["wall"])


@pytest.mark.cuda
def test_gpu_section_on_a_gpu(tmp_path: Path) -> None:
    rows, _ = _run_bench(tmp_path, "--only", "gpu")
    assert {kind for kind, _ in rows} >= {"gpu step", "gpu tokens"}
    assert all(row["tokens_per_s"] > 0 for (kind, _), row in rows.items() if kind == "gpu tokens")


def test_a_child_past_its_timeout_is_killed_with_its_own_children(tmp_path: Path) -> None:
    """A hung job (a launcher and its workers) must not outlive the benchmark: the whole session is killed."""
    pid_file = tmp_path / "worker.pid"
    script = (
        "import subprocess, sys, time; "
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid)); time.sleep(60)"
    )
    with pytest.raises(RuntimeError, match="ran past 3"):
        run_command([sys.executable, "-c", script], timeout=3)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie is dead, only not reaped yet


def test_paired_rounds_rotate_the_order_and_time_every_variant_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.bench import step_overhead

    order: list[str] = []

    def fake(name: str) -> Any:
        def train(work: Any, precision: str, batches: int, clock: step_overhead.StepClock, job: Job) -> None:
            order.append(name)
            for _ in range(batches):
                clock.tick()

        return train

    variants = ["plain", "fabric", "trainer"]
    monkeypatch.setattr(step_overhead, "TRAIN", {v: fake(v) for v in variants})
    job = Job("paired", [], 1, "unused", extra={"variants": variants, "rounds": 3})
    rounds = step_overhead._paired_rounds(step_overhead.WORKLOADS["small"], {"precision": "32-true", "steps": 2}, job)
    assert order == [*variants, "fabric", "trainer", "plain", "trainer", "plain", "fabric"]
    assert len(rounds) == 3
    assert all(set(r) == set(variants) and len(r["plain"]["wall"]) == 2 for r in rounds)
