"""mkdocs hooks: pages made from the sources when the site is built (``make docs``).

- ``notebooks/<name>.md``: each notebook's markdown cells and code, in order (outputs are left
  out: they come from running it, ``pytest --nbmake notebooks``);
- ``api/<module>.md``: one API reference page per public module of ``safety_circuits``,
  rendered by mkdocstrings from the docstrings.

Both lists are read from the tree, so a new module or notebook gets its page without an edit here.
"""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PACKAGE = ROOT / "safety_circuits"


def _modules() -> list[str]:
    names = ["safety_circuits"]
    for info in pkgutil.walk_packages([str(PACKAGE)], "safety_circuits."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _title(notebook: Path) -> str:
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return notebook.stem


def _notebook_page(notebook: Path) -> str:
    parts = [f"*`notebooks/{notebook.name}`: its text and code; run it to see the outputs.*\n"]
    for cell in json.loads(notebook.read_text())["cells"]:
        source = "".join(cell["source"]).strip()
        if not source:
            continue
        parts.append(source if cell["cell_type"] == "markdown" else f"```python\n{source}\n```")
    return "\n\n".join(parts) + "\n"


def on_config(config: Any) -> Any:
    config["nav"] = [
        *config["nav"],
        {"Notebooks": [{_title(nb): f"notebooks/{nb.stem}.md"} for nb in _notebooks()]},
        {"API reference": [{name: f"api/{name}.md"} for name in _modules()]},
    ]
    return config


def on_files(files: Files, config: Any) -> Files:
    for notebook in _notebooks():
        page = _notebook_page(notebook)
        files.append(File.generated(config, f"notebooks/{notebook.stem}.md", content=page))
    for name in _modules():
        files.append(File.generated(config, f"api/{name}.md", content=f"# `{name}`\n\n::: {name}\n"))
    return files
