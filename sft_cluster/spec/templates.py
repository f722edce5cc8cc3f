"""Built-in chat templates ``model.chat_template`` may name: ours, and the originals TRL ships.

Found without importing trl (the job file is checked before anything heavy loads).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_OWN = Path(__file__).resolve().parents[1] / "templates"


def _trl_folder() -> Path | None:
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "chat_templates"


def _builtin_paths() -> dict[str, Path]:
    """name -> file; TRL's generation-tagged ``*_training`` variants are not inference templates."""
    folders = [folder for folder in (_trl_folder(), _OWN) if folder is not None and folder.is_dir()]
    return {
        path.stem: path
        for folder in folders
        for path in sorted(folder.glob("*.jinja"))
        if not path.stem.endswith("_training")
    }


def builtin_template_names() -> list[str]:
    return sorted(_builtin_paths())


def is_template_path(value: str) -> bool:
    """A value naming a file rather than a built-in template."""
    return "/" in value or value.endswith(".jinja")


def template_problem(value: str) -> str | None:
    """What is wrong with a ``model.chat_template`` value (None: it names a template)."""
    if is_template_path(value):
        if Path(value).expanduser().is_file():
            return None
        return f"model.chat_template = {value!r}: no such file (give a .jinja file or a built-in name)"
    if value in _builtin_paths():
        return None
    return (
        f"model.chat_template = {value!r}: not a built-in template; use one of "
        f"{', '.join(builtin_template_names())}, or a path to a .jinja file"
    )


def read_template(value: str) -> str:
    """The template text a built-in name or a ``.jinja`` path names."""
    path = Path(value).expanduser() if is_template_path(value) else _builtin_paths()[value]
    return path.read_text(encoding="utf-8")
