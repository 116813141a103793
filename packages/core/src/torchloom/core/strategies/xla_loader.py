"""XLADeviceLoader: what the XLA strategies' ``process_dataloader`` returns."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torchloom.core.accelerators.xla import import_torch_xla

__all__ = ["XLADeviceLoader"]


class XLADeviceLoader:
    """Iterates ``dataloader`` and hands each batch to ``to_device`` (the strategy's ``batch_to_device``).

    Before fetching each batch it closes the XLA graph of the step before (``torch_xla.sync()``), as
    torch-xla's own loaders do, so evaluation loops without an optimizer step do not grow one graph over
    the whole epoch. Unlike torch-xla's ``MpDeviceLoader`` it fetches in the calling thread: a background
    thread drawing the shuffle and random transforms would make the data order depend on timing, and a
    resumed run could not continue it exactly. Attributes (``sampler``, ``dataset``, ...) are the loader's.
    """

    def __init__(self, dataloader: Iterable[Any], to_device: Callable[[Any], Any]) -> None:
        self._dataloader = dataloader
        self._to_device = to_device

    @property
    def dataloader(self) -> Iterable[Any]:
        return self._dataloader

    def __len__(self) -> int:
        return len(self._dataloader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        torch_xla = import_torch_xla("torch_xla", "XLADeviceLoader")
        for batch in self._dataloader:
            torch_xla.sync()
            yield self._to_device(batch)

    def __getattr__(self, name: str) -> Any:
        dataloader = self.__dict__.get("_dataloader")
        if dataloader is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(dataloader, name)

    def __repr__(self) -> str:
        return f"XLADeviceLoader({self._dataloader!r})"
