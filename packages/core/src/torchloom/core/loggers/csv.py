"""A dependency-free logger: ``metrics.csv`` and ``hparams.yaml`` in the run folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from typing_extensions import override

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import HParamValue, Logger, atomic_write_text

__all__ = ["CSVLogger"]


class CSVLogger(Logger):
    """Writes ``metrics.csv`` (columns ``step`` + every metric name, in order of first appearance) and
    ``hparams.yaml`` (flat ``"key": value`` lines, readable by any YAML parser) into :attr:`log_dir`.

    Rows are buffered and written every ``flush_every_n_steps`` steps, on :meth:`save` and
    :meth:`finalize`, and at interpreter exit. Consecutive calls for the same step fill one row
    unless they repeat a metric. A metric name seen for the first time widens the header: the file
    is then rewritten (temp file + rename) with empty cells for the rows before it; otherwise new
    rows are appended. A run folder that already holds a ``metrics.csv`` (an explicit version,
    resumed) is continued, not replaced.
    """

    METRICS_FILE = "metrics.csv"
    HPARAMS_FILE = "hparams.yaml"

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        name: str = "torchloom_logs",
        version: int | str | None = None,
        flush_every_n_steps: int = 100,
    ) -> None:
        super().__init__(root_dir, name, version)
        if isinstance(flush_every_n_steps, bool) or not isinstance(flush_every_n_steps, int) or flush_every_n_steps < 1:
            raise ConfigurationError(f"flush_every_n_steps must be an int >= 1, got {flush_every_n_steps!r}.")
        self._flush_every_n_steps = flush_every_n_steps
        self._columns: list[str] = []  # metric names, in order of first appearance
        self._pending: list[dict[str, float | int]] = []
        self._file_header: list[str] | None = None  # the header currently on disk, once known

    @property
    def flush_every_n_steps(self) -> int:
        return self._flush_every_n_steps

    @override
    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "step" in metrics:
            raise ConfigurationError("'step' names the CSV step column; log that metric under another name.")
        if self._file_header is None:
            self._adopt_existing_file()
        last = self._pending[-1] if self._pending else None
        if last is not None and last["step"] == step and not last.keys() & metrics.keys():
            last.update(metrics)
        else:
            self._pending.append({"step": step, **metrics})
        self._columns += [key for key in metrics if key not in self._columns]
        if len(self._pending) >= self._flush_every_n_steps:
            self._flush()

    @override
    def _write_hyperparams(self, params: dict[str, HParamValue], metric_names: list[str]) -> None:
        lines = ["# Hyperparameters logged by torchloom; nested keys are joined with '/'.\n"]
        lines += [f"{json.dumps(key, ensure_ascii=False)}: {_yaml_scalar(value)}\n" for key, value in params.items()]
        if not params:
            lines.append("{}\n")
        atomic_write_text(Path(self.log_dir, self.HPARAMS_FILE), "".join(lines))

    @override
    def _save(self) -> None:
        self._flush()

    def _adopt_existing_file(self) -> None:
        path = Path(self.log_dir, self.METRICS_FILE)
        if not path.is_file():
            self._file_header = []
            return
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header[:1] != ["step"]:
            raise ConfigurationError(
                f"{str(path)!r} exists but is not a metrics file of this logger (its first column is not 'step'); "
                "choose another version or move the file."
            )
        self._file_header = header
        self._columns = header[1:]

    def _flush(self) -> None:
        if not self._pending:
            return
        path = Path(self.log_dir, self.METRICS_FILE)
        header = ["step", *self._columns]
        new_rows = [[row.get(key, "") for key in header] for row in self._pending]
        if self._file_header == header and path.is_file():
            with path.open("a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(new_rows)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(header)
            # Columns only ever grow at the end, so old rows just need empty cells appended.
            writer.writerows(row + [""] * (len(header) - len(row)) for row in _data_rows(path))
            writer.writerows(new_rows)
            atomic_write_text(path, buffer.getvalue())
        self._file_header = header
        self._pending.clear()


def _data_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))[1:]


def _yaml_scalar(value: HParamValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        # YAML 1.1 parsers (PyYAML) only read a float with a dot in it: 1e-05 -> 1.0e-05.
        return text if "." in text else text.replace("e", ".0e")
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=False)
