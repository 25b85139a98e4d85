"""Print how the running environment's packages differ from a lock file's pins.

``make test-latest`` runs it in the fresh venv of the newest allowed releases, so that a failing
drift check names what changed (``drift: transformers 5.24.0 -> 5.25.0``). Exit status 1 when a
run-time dependency of the package differs (then the unit tests run there), 0 when only the
development and documentation tools do, or nothing.

    python scripts/lock_drift.py requirements.lock requirements-data.lock
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

_NOT_LOCKED = {"pip", "safety-circuits"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of a pip lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[_key(m[1])] = m[2]
    if not pins:
        raise SystemExit(f"error: {path} has no `name==version` lines: is it a lock file?")
    return pins


def installed() -> dict[str, str]:
    return {_key(d.metadata["Name"]): d.version for d in metadata.distributions()}


def runtime_closure(root: str = "safety-circuits") -> set[str]:
    """The installed packages ``root`` needs at run time: its dependencies without extras, and
    theirs, transitively (the dev and docs tools are not among them)."""
    seen, todo = set(), [root]
    while todo:
        name = _key(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req.replace('"', "").replace("'", ""):
                continue
            marker_ok = ";" not in req or _marker_holds(req.split(";", 1)[1])
            if marker_ok:
                todo.append(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])
    return seen - {_key(root)}


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python scripts/lock_drift.py LOCK [LOCK ...]")
    pins = {name: version for path in argv for name, version in locked(Path(path)).items()}
    have = installed()
    changed = [(n, pins[n], have.get(n, "absent")) for n in sorted(pins) if have.get(n) != pins[n]]
    added = sorted(set(have) - set(pins) - _NOT_LOCKED)
    for name, was, now in changed:
        print(f"drift: {name} {was} -> {now}")
    for name in added:
        print(f"drift: {name} {have[name]} (not in the lock)")
    print(f"drift: {len(changed)} of {len(pins)} locked packages differ, {len(added)} new")
    runtime = sorted(runtime_closure() & ({n for n, _, _ in changed} | set(added)))
    print(f"drift: of the package's run-time dependencies: {', '.join(runtime) or 'none'}")
    return 1 if runtime else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
