"""TensorBoard event files through ``torch.utils.tensorboard`` (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import HParamValue, Logger
from torchloom.core.utils import rank_zero
from torchloom.core.utils.imports import require

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardLogger"]

_FEATURE = "TensorBoardLogger"
_STATUS_NAMES = {"success": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "aborted": "STATUS_ABORTED"}


class TensorBoardLogger(Logger):
    """Scalars and hyperparameters as TensorBoard events in :attr:`log_dir` (one run per version).

    Hyperparameters go into the same run through the HPARAMS plugin, together with the names of
    any ``metrics`` passed to :meth:`log_hyperparams`, so the HPARAMS tab lists them side by side.
    TensorBoard keeps a run's first hyperparameter summary, so every :meth:`log_hyperparams` call
    made before the first metric is merged and written once; later changes only warn.
    ``finalize(status)`` records the run's end status there and closes the event file.
    ``writer_kwargs`` go to ``SummaryWriter`` (``max_queue``, ``flush_secs``, ``filename_suffix``, ...).
    Booleans are shown as 1/0 by TensorBoard's HPARAMS tab.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        name: str = "torchloom_logs",
        version: int | str | None = None,
        **writer_kwargs: Any,
    ) -> None:
        super().__init__(root_dir, name, version)
        require("tensorboard", _FEATURE)  # fail at construction, not in the middle of a run
        if "log_dir" in writer_kwargs:
            raise ConfigurationError(
                "TensorBoardLogger chooses the SummaryWriter's log_dir itself (root_dir/name/version); "
                f"remove log_dir={writer_kwargs['log_dir']!r}."
            )
        self._writer_kwargs = writer_kwargs
        self._writer: SummaryWriter | None = None
        self._pending_hyperparams: tuple[dict[str, HParamValue], list[str]] | None = None
        self._written_hyperparams: tuple[dict[str, HParamValue], list[str]] | None = None

    @property
    def experiment(self) -> SummaryWriter | None:
        """The underlying ``SummaryWriter`` for images, histograms, ...; ``None`` on a non-zero rank."""
        if rank_zero.global_rank() != 0:
            return None
        if self._writer is None:
            require("tensorboard", _FEATURE)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, **self._writer_kwargs)
        return self._writer

    @override
    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        writer = self._rank_zero_writer()
        self._write_pending_hyperparams()
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)

    @override
    def _write_hyperparams(self, params: dict[str, HParamValue], metric_names: list[str]) -> None:
        # TensorBoard keeps the first hyperparameter summary of a run, so calls are merged until the
        # run's first scalar (or save/finalize) and written once.
        if self._written_hyperparams is None:
            self._pending_hyperparams = (params, metric_names)
            return
        written, written_metrics = self._written_hyperparams
        ignored = [key for key, value in params.items() if key not in written or written[key] != value]
        ignored += [name for name in metric_names if name not in written_metrics]
        if ignored:
            rank_zero.rank_zero_warn(
                f"TensorBoard shows the hyperparameters written before the run's first metric; {ignored} "
                "came later and will not appear in its HPARAMS tab. Log all hyperparameters before any metric."
            )

    @override
    def _save(self) -> None:
        if self._pending_hyperparams is not None:
            self._write_pending_hyperparams()
        if self._writer is not None:
            self._writer.flush()

    @override
    def _finalize(self, status: str) -> None:
        self._save()
        if self._writer is None:
            return
        if self._written_hyperparams is not None:
            _add_summary(self._writer, _session_end_summary(status))
        self._writer.close()
        self._writer = None

    def _write_pending_hyperparams(self) -> None:
        if self._pending_hyperparams is None:
            return
        from torch.utils.tensorboard.summary import hparams

        params, metric_names = self._pending_hyperparams
        # Only the metric names matter here; their values are logged as scalars.
        experiment, session_start, _ = hparams(params, dict.fromkeys(metric_names, 0.0))  # type: ignore[no-untyped-call]
        writer = self._rank_zero_writer()
        _add_summary(writer, experiment)
        _add_summary(writer, session_start)
        self._written_hyperparams, self._pending_hyperparams = self._pending_hyperparams, None

    @override
    def __getstate__(self) -> dict[str, Any]:
        # An open SummaryWriter (threads, file handles) cannot travel to another process.
        state = super().__getstate__()
        state["_writer"] = None
        return state

    def _rank_zero_writer(self) -> SummaryWriter:
        writer = self.experiment
        assert writer is not None, "the Logger base only calls writers on rank 0"
        return writer


def _add_summary(writer: SummaryWriter, summary: Any) -> None:
    # SummaryWriter has no public call for a ready-made Summary proto; add_hparams uses the same route.
    writer._get_file_writer().add_summary(summary)  # type: ignore[no-untyped-call]


def _session_end_summary(status: str) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(_STATUS_NAMES[status]), end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(session_end_info=end, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    value = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))
    return Summary(value=[value])
