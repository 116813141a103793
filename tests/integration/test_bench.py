"""The benchmark suite runs end to end on its tiny configuration (no timing assertions: these machines are noisy)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    expected = {
        f"{variant} {work} {precision}"
        for variant in ("plain", "plain-again", "fabric", "trainer")
        for work in ("small", "large")
        for precision in ("32-true", "bf16-mixed")
    } | {"torch", "torchloom.core", "torchloom.fabric", "torchloom.trainer"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, name
        assert row["median"] > 0, name
        assert row["status"] in ("PASS", "FAIL", "info"), name
        if row["kind"] == "step":
            assert math.isfinite(row["cpu_ratio"]), name
    # the table printed is the same numbers
    assert "trainer large bf16-mixed" in done.stdout and "torchloom.trainer" in done.stdout
    assert rows["plain small 32-true"]["ratio"] == 1.0 and rows["torch"]["ratio"] == 1.0
    assert rows["fabric small 32-true"]["target"] == 1.03 and rows["torchloom.trainer"]["target"] == 1.25
