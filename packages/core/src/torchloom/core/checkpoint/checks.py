"""Refusing bad checkpoints: every way a checkpoint cannot be loaded becomes one ``CheckpointError``.

``safe_load`` is ``torch.load`` that turns torch's assorted failures (``EOFError``, ``UnpicklingError``,
``RuntimeError("PytorchStreamReader failed ...")``, ...) into a ``CheckpointError`` naming the path and
what is wrong: a truncated or corrupt file, or (``weights_only=True``, the default) a pickle that would
need to import and call code, which torch's restricted unpickler refuses before running anything.

Versions: a checkpoint written by torchloom records the writing version under ``VERSION_KEY``
(``"torchloom_version"``): the Trainer's checkpoint dict, every ``Fabric.save``, and the metadata files of
sharded and DeepSpeed checkpoint directories. ``check_version`` refuses a checkpoint of a newer
MAJOR.MINOR than the torchloom running (patch releases never change what a checkpoint holds); an older or
equal one, or one without the key (a plain ``torch.save`` file), loads.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, NoReturn

import torch

from torchloom.core.errors import CheckpointError

__all__ = [
    "VERSION_KEY",
    "check_checkpoint",
    "check_dcp_metadata",
    "check_entries",
    "check_version",
    "refuse_directory",
    "running_version",
    "safe_load",
]

VERSION_KEY = "torchloom_version"
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:[.+\-].*)?$")
_GLOBAL = re.compile(r"GLOBAL ((?:\w+\.)+\w+)")  # module.name: a pickle asking to import something


def check_entries(path: str | os.PathLike[str], state: Any, available: Any, strict: bool) -> None:
    """With ``strict``, a ``KeyError`` naming the keys of ``state`` that the checkpoint's entries ``available`` lack;
    raised before anything is loaded."""
    missing = [key for key in state if key not in available]
    if strict and missing:
        raise KeyError(
            f"The checkpoint at {os.fspath(path)!r} has no entry for {missing}; it holds {sorted(available)}. "
            "Pass strict=False to load the rest."
        )


def running_version() -> str:
    """The version of the torchloom running (the packages are released together, in lock step)."""
    from torchloom.core import __version__

    return __version__


def safe_load(
    path: str | os.PathLike[str], map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False
) -> Any:
    """``torch.load(path)`` whose failures to read the file are ``CheckpointError``; any object comes back.

    ``mmap=True`` maps tensor data instead of reading it: a check of what a file holds costs its pickle only."""
    target = Path(path)
    try:
        return torch.load(target, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as error:
        text = str(error)
        if isinstance(error, RuntimeError) and "deserialize object on" in text:
            raise  # a map_location the machine cannot serve (a CUDA checkpoint without CUDA): not the file's fault
        raise CheckpointError(_explain(target, error, text, weights_only)) from error


def _explain(path: Path, error: Exception, text: str, weights_only: bool) -> str:
    unsafe = _GLOBAL.search(text) if weights_only and "Weights only load failed" in text else None
    if unsafe is not None:
        return (
            f"The checkpoint {str(path)!r} was refused: it holds pickled objects that need importing and calling "
            f"{unsafe.group(1)}, which could run arbitrary code, and loading is weights_only=True. Nothing in the "
            "file was executed. A torchloom checkpoint holds only tensors and plain values. Only if you trust where "
            "the file comes from, load it on purpose with weights_only=False (e.g. fabric.load(path, "
            "weights_only=False), or torch.load(path, weights_only=False))."
        )
    reason = _first_line(text) if text.strip() or not isinstance(error, EOFError) else "the file ends early"
    if weights_only and "Weights only load failed" in text:
        reason = _weights_only_reason(text)
    return (
        f"The checkpoint {str(path)!r} is not a complete torch checkpoint file: it is truncated or corrupt, or not "
        f"a checkpoint at all (torch.load failed with {type(error).__name__}: {reason}). Nothing in the file was "
        "executed. Load an intact copy (a save cut short leaves the previous checkpoint in place) or save it again."
    )


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "no message")
    return line if len(line) <= 200 else f"{line[:200]}..."


def _weights_only_reason(text: str) -> str:
    """The line of torch's weights_only message that says what it met (its other lines are advice)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation")):
            return _first_line(line.removeprefix("WeightsUnpickler error:").strip() or line)
    return "its restricted unpickler refused the contents"


def check_checkpoint(checkpoint: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``checkpoint`` if it is a dict from a torchloom that this one can read; else ``CheckpointError``."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"The checkpoint {os.fspath(path)!r} holds a {type(checkpoint).__name__}, not a dict: it is not a "
            "checkpoint (torchloom saves a dict of named entries, and a state dict is a dict too). For a bare object "
            "saved with torch.save, use torch.load(path, weights_only=True)."
        )
    if VERSION_KEY in checkpoint:
        check_version(checkpoint[VERSION_KEY], path)
    return checkpoint


def read_format_file(path: Path, format: str, version: int, what: str) -> dict[str, Any]:
    """A metadata file torchloom writes beside a checkpoint directory, after checking it is ``format`` v``version``.

    ``what`` names the file in the error (for example "the sharded checkpoint's metadata")."""
    content = check_checkpoint(safe_load(path, map_location="cpu", weights_only=True), path)
    if content.get("format") != format or content.get("version") != version:
        raise CheckpointError(
            f"{str(path)!r} is not in the format this torchloom reads ({format} v{version}): {what} is corrupt, or "
            "from another program."
        )
    return content


def check_version(recorded: Any, path: str | os.PathLike[str]) -> None:
    """Refuses ``recorded`` (the version a checkpoint was written by) if it is newer than the running torchloom."""
    running = running_version()
    match = _VERSION.match(recorded) if isinstance(recorded, str) else None
    if match is None:
        raise CheckpointError(
            f"The checkpoint {os.fspath(path)!r} records {VERSION_KEY}={recorded!r}, which is not a version "
            "('MAJOR.MINOR.PATCH'): it is corrupt or was not written by torchloom. Load an intact copy."
        )
    saved = (int(match.group(1)), int(match.group(2)))
    current = _VERSION.match(running)
    assert current is not None, running
    if saved > (int(current.group(1)), int(current.group(2))):
        raise CheckpointError(
            f"The checkpoint {os.fspath(path)!r} was written by torchloom {recorded}, which is newer than the "
            f"torchloom {running} running here; this version may misread it. Upgrade torchloom to "
            f"{saved[0]}.{saved[1]} or later to load it."
        )


def refuse_directory(path: str | os.PathLike[str]) -> NoReturn:
    """``CheckpointError`` for a directory that is not a complete sharded or DeepSpeed checkpoint, saying which."""
    from torchloom.core.checkpoint.deepspeed import EXTRA_FILE
    from torchloom.core.checkpoint.distributed import META_FILE

    folder = Path(path)
    where = f"{str(folder)!r}"
    if (folder / "latest").is_file() or (folder / EXTRA_FILE).is_file():
        missing = EXTRA_FILE if (folder / "latest").is_file() else "latest"
        raise CheckpointError(
            f"{where} is an incomplete DeepSpeed checkpoint: it lacks {missing!r} (torchloom writes "
            f"{EXTRA_FILE!r} last, after every rank finished, so the save was cut short). Load the previous "
            "checkpoint, or save again."
        )
    if (folder / ".metadata").is_file() or (folder / META_FILE).is_file():
        missing = META_FILE if (folder / ".metadata").is_file() else ".metadata"
        raise CheckpointError(
            f"{where} is an incomplete sharded checkpoint: it lacks {missing!r} (a complete one holds DCP's "
            f"'.metadata' and torchloom's {META_FILE!r}). Load the previous checkpoint, or save again."
        )
    raise CheckpointError(
        f"{where} is a directory but not a torchloom checkpoint: a sharded checkpoint holds {META_FILE!r} and "
        f"'.metadata', a DeepSpeed one 'latest' and {EXTRA_FILE!r}. Valid: a checkpoint file or a complete "
        "checkpoint directory."
    )


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a plain pickle) allowing only what DCP writes there: its metadata classes,
    torch dtypes, ``torch.Size``, layouts and paths. Any other global is refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        import pathlib

        from torch.distributed.checkpoint import filesystem, metadata

        value: Any = None
        if module == "torch.distributed.checkpoint.metadata":
            value = getattr(metadata, name, None)
        elif module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            value = filesystem._StorageInfo
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            value = getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":
            value = torch.serialization._get_layout
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            value = getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            import collections

            value = collections.OrderedDict
        if value is None or not (isinstance(value, (type, torch.dtype)) or value is torch.serialization._get_layout):
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in DCP metadata")
        return value


def check_dcp_metadata(path: str | os.PathLike[str]) -> None:
    """Refuses a sharded checkpoint whose DCP ``.metadata`` (which DCP unpickles without restriction) is
    truncated, corrupt, or holds globals DCP never writes, which could run code; nothing in it is executed."""
    file = Path(path) / ".metadata"
    try:
        data = file.read_bytes()
        _DCPMetadataUnpickler(io.BytesIO(data)).load()
    except Exception as error:
        unsafe = _GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if unsafe is not None:
            raise CheckpointError(
                f"The sharded checkpoint {os.fspath(path)!r} was refused: its DCP metadata file {str(file)!r} holds "
                f"pickled objects that need importing and calling {unsafe.group(1)}, which could run arbitrary code "
                "and which DCP never writes there. Nothing in the file was executed. Load a checkpoint you saved."
            ) from error
        raise CheckpointError(
            f"The sharded checkpoint {os.fspath(path)!r} is incomplete or corrupt: its DCP metadata file "
            f"{str(file)!r} cannot be read ({type(error).__name__}: {_first_line(str(error))}). Nothing in the file "
            "was executed. Load the previous checkpoint, or save again."
        ) from error
