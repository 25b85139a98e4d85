"""Atomic writes (a file or folder appears whole at its final path, or not at all),
safetensors files with a JSON header (no pickles), and the dict form of config dataclasses."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_VERSION = 1
_R = TypeVar("_R", bound="Record")
_T = TypeVar("_T", bound="TableResult")


class TableResult:
    """A result held as one table, ``frame``, beside other fields (``config``, a threshold).

    ``to_frame`` gives a copy of the table; ``to_dict`` the other fields and the table's rows,
    which ``from_dict`` reads back (a class whose table needs its dtypes restored overrides both).
    """

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        others = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "frame"}  # type: ignore[arg-type]
        return {**others, "rows": self.frame.to_dict("records")}  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls: type[_T], d: Mapping[str, Any]) -> _T:
        others = {f.name: d[f.name] for f in fields(cls) if f.name != "frame" and f.name in d}  # type: ignore[arg-type]
        return cls(frame=pd.DataFrame(d["rows"]), **others)


class Record:
    """``to_dict`` / ``from_dict`` of a dataclass of JSON-ready fields (a config, a recipe).

    ``from_dict`` names the keys the class does not have (a corrupted or foreign file), unless
    the class sets ``ignore_unknown`` (it then reads its own keys from a larger record).
    """

    ignore_unknown: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_R], d: Mapping[str, Any]) -> _R:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown and not cls.ignore_unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def resolve(cls: type[_R], config: _R | None = None, **overrides: Any) -> _R:
        """``config`` (default: the class's defaults) with ``overrides`` set, checked again: the
        ``f(..., config=None, **overrides)`` of a function with many options. Unknown names raise.

        >>> from safety_circuits.tuning import TuneConfig
        >>> TuneConfig.resolve(TuneConfig(lr=1e-3), epochs=2).epochs
        2
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got a {type(config).__name__}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} options {unknown}; the options are {names}")
        return replace(config if config is not None else cls(), **overrides)  # type: ignore[type-var]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it is renamed to ``target``.

    Without ``overwrite`` an existing ``target`` is an error (raised before any work is done).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], kind: str, header: dict[str, Any]
) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically, with ``header`` as JSON beside them."""
    path = Path(path)
    full = {"format": f"safety_circuits.{kind}", "version": FORMAT_VERSION, **header}
    with atomic_file(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"safety_circuits": json.dumps(full)},
        )
    return path


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors` for ``kind``; a clear ``ValueError`` otherwise."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            header = json.loads((f.metadata() or {})["safety_circuits"])
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid {kind} file (corrupted or foreign): {e}") from e
    if header.get("format") != f"safety_circuits.{kind}" or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {kind} file of format version {FORMAT_VERSION}")
    return tensors, header
