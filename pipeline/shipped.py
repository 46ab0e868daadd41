"""The configs and data that ship with the pipeline, found from any working directory.

A source checkout (and an editable install) keeps them beside the packages, in ``configs/`` and
``data/``; a wheel installs them as data files under ``<prefix>/share/rlhf-pipeline/``.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SHARE = Path("share") / "rlhf-pipeline"
# What a shipped config may be named after: with or without its suffix.
_SUFFIXES = ("", ".yaml", ".yml", ".json")


def _candidates() -> list[Path]:
    roots = [_HERE.parent]
    # <prefix>/lib/pythonX.Y/site-packages/pipeline -> <prefix>/share/rlhf-pipeline: venvs,
    # --prefix and --user installs; sysconfig's data paths cover other layouts.
    if len(_HERE.parents) > 3:
        roots.append(_HERE.parents[3] / SHARE)
    roots.append(Path(sysconfig.get_path("data")) / SHARE)
    roots.append(Path(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))) / SHARE)
    return roots


def root() -> Path | None:
    """The folder holding the shipped ``configs/`` and ``data/``, or None if none is found."""
    return next((r for r in _candidates() if (r / "configs" / "default.yaml").is_file()), None)


def configs() -> dict[str, Path]:
    """Shipped configs by name: ``default``, ``quick``, ``accelerate/cpu_2proc``, ..."""
    base = root()
    if base is None:
        return {}
    folder = base / "configs"
    found = {path.relative_to(folder).with_suffix("").as_posix(): path
             for path in folder.rglob("*")
             if path.is_file() and path.suffix in (".yaml", ".yml", ".json")}
    # Pipeline configs first, then the launcher ones (accelerate/, deepspeed/).
    return dict(sorted(found.items(), key=lambda kv: ("/" in kv[0], kv[0])))


def find_config(name: str) -> Path | None:
    """A shipped config by name (``default``), file name (``quick.yaml``) or repository path
    (``configs/quick.yaml``)."""
    base = root()
    if base is None:
        return None
    name = name.strip()
    for stem in (name, name.removeprefix("configs/")):
        for suffix in _SUFFIXES:
            path = base / "configs" / f"{stem}{suffix}"
            if path.is_file() and path.resolve().is_relative_to((base / "configs").resolve()):
                return path
    return None


def resolve_config(config_file: str | Path) -> Path:
    """``config_file`` itself when it exists, else the shipped config of that name; the given
    path when neither exists (the caller reports it)."""
    path = Path(config_file)
    if path.is_file():
        return path
    return find_config(str(config_file)) or path


def data_file(value: str) -> str:
    """A relative data path that is missing here but ships with the pipeline (the default
    ``data/wordnet/*.jsonl``) as the shipped file's absolute path; anything else unchanged."""
    path = Path(value)
    if not value or path.is_absolute() or path.exists():
        return value
    base = root()
    if base is None or not path.parts or path.parts[0] != "data":
        return value
    shipped = base / path
    return str(shipped) if shipped.exists() else value


def describe(path: Path) -> str:
    """What a shipped config is for: the first sentence of its leading comment (its file name
    when it has none, as JSON files do)."""
    words: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        text = line.strip()
        if not text.startswith("#") or not text.lstrip("#").strip():
            break
        words.append(text.lstrip("#").strip())
        if words[-1].endswith((".", ":")):
            break
    return " ".join(words).rstrip(":") or path.name


def copy_config(name: str, dest: str | Path) -> Path:
    """Copy the shipped config ``name`` to ``dest`` (a file, or a folder to put it in).

    Refuses to overwrite: ``dest`` may be a user's edited copy."""
    source = find_config(name)
    if source is None:
        known = ", ".join(configs()) or "none found"
        raise FileNotFoundError(f"no shipped config named {name!r} (shipped: {known})")
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another destination")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target.parent}: no such folder")
    shutil.copyfile(source, target)
    return target
