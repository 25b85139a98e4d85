"""Print how the running environment's packages differ from a lock file's pins.

``make test-latest`` runs it in the fresh venv of the newest allowed releases, so that a failing
drift check names what changed (``drift: transformers 5.24.0 -> 5.25.0``). Exit status 1 when
anything differs, 0 when the environment is exactly the locks' pins.

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
    return 1 if changed or added else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
