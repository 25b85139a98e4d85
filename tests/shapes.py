"""Shape checking for the test run: every jaxtyping-annotated function of the package, checked.

:func:`instrument` wraps each function and method of a package that has an argument or return
value annotated with a jaxtyping array type (``Float[Tensor, "batch pos d_mlp"]``) in
:func:`check_shapes`, in every module that refers to it. On each call those values' dtype, rank
and named dimensions are checked against one dimension memo (``jaxtyped`` as a context), so that
``batch`` must have one size across all of a call's arguments and its result.

Only array hints are checked, and only where they are written: a full runtime type checker
(beartype through jaxtyping's import hook) would also check every other hint, answer bad input
with its own type error before the package's clear ``ValueError`` (which the tests assert), and
wrap every function of the package, which made the unit tests 60% slower.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from jaxtyping import AbstractArray, jaxtyped


def _array_hints(hint: Any) -> tuple[tuple[type, ...], bool]:
    """The jaxtyping array types in ``hint`` (itself or the members of a union), and whether
    nothing else is allowed."""
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return (hint,), True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        arrays = tuple(m for m in members if isinstance(m, type) and issubclass(m, AbstractArray))
        return arrays, len(arrays) == len(members)
    return (), False


def _check(value: Any, hints: tuple[tuple[type, ...], bool], what: str, fn: Callable) -> None:
    arrays, only_arrays = hints
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if not any(isinstance(value, a) for a in arrays):
            raise TypeError(
                f"{fn.__qualname__}: {what} has dtype {value.dtype} and shape {tuple(value.shape)}, "
                f"not {' or '.join(a.__name__ for a in arrays)} (dimension sizes must agree across the call)"
            )
    elif only_arrays:
        raise TypeError(f"{fn.__qualname__}: {what} is a {type(value).__name__}, not an array")


def _hints(fn: Callable) -> dict[str, tuple[tuple[type, ...], bool]]:
    """The array hints of ``fn``'s arguments (and ``"return"``), annotations resolved where they can be."""
    found = {}
    namespace = inspect.unwrap(fn).__globals__  # a decorator's wrapper has its own module's globals
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        if isinstance(annotation, str):
            if not any(f"{t}[" in annotation for t in ("Float", "Int", "Bool", "Num", "Shaped")):
                continue
            try:
                annotation = eval(annotation, namespace)  # the package's own annotations
            except NameError:
                continue
        hints = _array_hints(annotation)
        if hints[0]:
            found[name] = hints
    return found


def check_shapes(fn: Callable) -> Callable:
    """``fn``, checking its array-annotated arguments and return value on every call against
    one dimension memo (``jaxtyped`` as a context)."""
    hints = _hints(fn)
    returns = hints.pop("return", None)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        with jaxtyped("context"):
            bound = signature.bind(*args, **kwargs)
            for name, arg_hints in hints.items():
                if name in bound.arguments:
                    _check(bound.arguments[name], arg_hints, f"argument {name!r}", fn)
            out = fn(*args, **kwargs)
            if returns is not None:
                _check(out, returns, "the return value", fn)
        return out

    return checked


def _modules(package: str) -> Iterator[types.ModuleType]:
    root = importlib.import_module(package)
    yield root
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        yield importlib.import_module(info.name)


def instrument(package: str) -> int:
    """Wrap every array-annotated function and method of ``package``, wherever a module refers
    to it; returns how many were wrapped."""
    modules = list(_modules(package))
    wrapped: dict[int, Callable] = {}
    for module in modules:
        for owner in [module, *(c for c in vars(module).values() if isinstance(c, type))]:
            if getattr(owner, "__module__", module.__name__) != module.__name__:
                continue
            for name, attr in list(vars(owner).items()):
                fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                if not inspect.isfunction(fn) or fn.__module__ != module.__name__ or not _hints(fn):
                    continue
                new = check_shapes(fn)
                wrapped[id(fn)] = new
                setattr(owner, name, type(attr)(new) if fn is not attr else new)
    for module in modules:  # the names other modules imported before the wrapping
        for name, attr in list(vars(module).items()):
            if inspect.isfunction(attr) and id(attr) in wrapped:
                setattr(module, name, wrapped[id(attr)])
    return len(wrapped)
