"""Conventions every public function keeps (issue 15's API hygiene), checked over the package."""

import importlib
import inspect
import pkgutil

import safety_circuits


def _public_functions():
    for info in pkgutil.walk_packages(safety_circuits.__path__, "safety_circuits."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name, fn in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", fn


def test_progress_bars_are_on_by_default():
    """One default everywhere: a function that can show progress shows it unless told not to."""
    off = [
        name
        for name, fn in _public_functions()
        if "progress" in inspect.signature(fn).parameters
        and inspect.signature(fn).parameters["progress"].default is not True
    ]
    assert not off, f"progress defaults to something other than True in {off}"
