"""Atomic writes (a file or folder appears whole at its final path, or not at all),
safetensors files with a JSON header (no pickles), the dict form of config dataclasses, and
``save`` / ``load`` of the results kept as JSON (:class:`JSONResult`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from safety_circuits.architecture import Architecture
    from safety_circuits.loading import Subject

FORMAT_VERSION = 1
_R = TypeVar("_R", bound="Record")
_T = TypeVar("_T", bound="TableResult")
_J = TypeVar("_J", bound="JSONResult")


def arch_to_dict(arch: Architecture | None) -> dict[str, Any] | None:
    """A result's ``arch`` for its ``to_dict`` (``None`` for a result not tied to one model)."""
    return None if arch is None else arch.to_dict()


def arch_from_dict(d: Mapping[str, Any] | None) -> Architecture | None:
    """The inverse of :func:`arch_to_dict`; ``None`` too for a file saved before results had one."""
    from safety_circuits.architecture import Architecture

    return None if d is None else Architecture.from_dict(d)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


class JSONResult:
    """``save`` / ``load`` of a result as one JSON file (never a pickle): its ``to_dict`` with the
    result type's name and a format version; ``from_dict`` reads it back.

    A result made from a model records its :class:`~safety_circuits.architecture.Architecture` in
    ``arch`` (``None`` if made by hand), so ``load(path, expect=subject)`` can check the file
    was made for that model, as ``NeuronSet.load`` does.
    """

    arch: Architecture | None

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[_J], d: Mapping[str, Any]) -> _J:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to a JSON file at ``path``, atomically (temp file, then rename)."""
        path = Path(path)
        d = {"format": f"safety_circuits.{type(self).__name__}", "version": FORMAT_VERSION, **self.to_dict()}
        text = json.dumps(d, indent=1, default=_json_default)
        with atomic_file(path) as tmp:
            tmp.write_text(text)
        return path

    @classmethod
    def load(cls: type[_J], path: str | os.PathLike, expect: Architecture | Subject | None = None) -> _J:
        """Read a file written by :meth:`save` (or a bare ``to_dict`` as JSON); with ``expect`` (a
        model or its architecture), check the result was made for it."""
        from safety_circuits.neurons import check_expected

        path, what = Path(path), cls.__name__
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise TypeError("it holds no JSON object")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError too
            raise ValueError(f"{path} is not a valid {what} file (corrupted or foreign): {e}") from e
        fmt = d.pop("format", None)
        version = d.pop("version", FORMAT_VERSION)
        if fmt is not None and fmt != f"safety_circuits.{what}":
            raise ValueError(f"{path} holds a {str(fmt).removeprefix('safety_circuits.')}, not a {what}")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} is a {what} file of format version {version}, not {FORMAT_VERSION}")
        try:
            result = cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid {what} file (corrupted or foreign): {e!r}") from e
        if expect is not None:
            if result.arch is None:
                raise ValueError(
                    f"{path} records no model (a {what} saved before results recorded their model, or "
                    "made by hand), so it cannot be checked against expect=; load it without expect"
                )
            check_expected(result.arch, expect, f"{what} file {path.name}")
        return result


class TableResult(JSONResult):
    """A result held as one table, ``frame``, beside other fields (``config``, a threshold, the
    model's ``arch``).

    ``to_frame`` gives a copy of the table; ``to_dict`` the other fields and the table's rows,
    which ``from_dict`` reads back (a class whose table needs its dtypes restored overrides both);
    ``save`` / ``load`` write and read them as JSON (:class:`JSONResult`).
    """

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        others = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("frame", "arch")}  # type: ignore[arg-type]
        rows = self.frame.to_dict("records")  # type: ignore[attr-defined]
        return {**others, "arch": arch_to_dict(self.arch), "rows": rows}

    @classmethod
    def from_dict(cls: type[_T], d: Mapping[str, Any]) -> _T:
        names = {f.name for f in fields(cls)} - {"frame", "arch"}  # type: ignore[arg-type]
        others = {k: d[k] for k in names if k in d}
        return cls(frame=pd.DataFrame(d["rows"]), arch=arch_from_dict(d.get("arch")), **others)  # type: ignore[call-arg]


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
