"""Importing a user's class or function from a dotted path (``--model mymodule.MyNet``), with errors naming the fix.

The ``spe-lightning`` console script does not look for modules in the current folder (unlike
``python -m``), so ``--model mymodule.MyNet`` with ``mymodule.py`` next to the user fails with "No module named
'mymodule'" unless the folder is on ``PYTHONPATH`` or the package is installed; these messages say so.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["import_object", "missing_module_hint", "find_missing_class_paths"]


def missing_module_hint(path: str, flag: str) -> str | None:
    """Why the module of ``path`` (``pkg.mod.Name``) cannot be found and how to fix it; None when it can."""
    module = path.rpartition(".")[0]
    if not module:
        return None
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent that is not a package, a broken parent
            found = False
        if not found:
            return _not_found(name, path, flag)
    return None


def _not_found(name: str, path: str, flag: str) -> str:
    top = name.split(".")[0]
    here = Path.cwd()
    local = (here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()
    where = (
        f"{top!r} is in the current folder, but the spe-lightning command does not look there"
        if local
        else f"no module named {name!r} is on the Python path"
    )
    return (
        f"{flag} {path}: {where}. Run from the folder that holds {top}.py (or the {top}/ package) with "
        f"PYTHONPATH=. (e.g. PYTHONPATH=. spe-lightning ...), or install the package (pip install -e .) "
        f"in this environment ({sys.executable})."
    )


def import_object(path: str, flag: str = "--model", example: str = "mypackage.module.Name") -> Any:
    """The object at the dotted ``path``; ``ValueError`` naming the fix when it cannot be imported."""
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{flag} {path!r}: give a full dotted path, e.g. {example}.")
    hint = missing_module_hint(path, flag)
    if hint is not None:
        raise ValueError(hint)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:  # the module was found; something it imports was not
        missing = err.name or str(err)
        raise ValueError(
            f"{flag} {path}: importing {module} failed because it imports {missing!r}, which is not installed "
            f"in this environment ({sys.executable}): pip install the package that provides it."
        ) from err
    except Exception as err:  # the module's own code failed
        raise ValueError(f"{flag} {path}: importing {module} failed: {type(err).__name__}: {err}") from err
    try:
        return getattr(mod, name)
    except AttributeError as err:
        names = sorted(n for n in dir(mod) if not n.startswith("_"))[:20]
        raise ValueError(f"{flag} {path}: {module} has no {name!r} (it defines {', '.join(names)}).") from err


def _class_paths(obj: Any) -> list[str]:
    """Every ``class_path`` value in a parsed config (nested dicts and lists)."""
    if isinstance(obj, dict):
        out = [obj["class_path"]] if isinstance(obj.get("class_path"), str) else []
        for v in obj.values():
            out += _class_paths(v)
        return out
    if isinstance(obj, list):
        return [p for v in obj for p in _class_paths(v)]
    return []


def find_missing_class_paths(args: list[str]) -> list[str]:
    """For LightningCLI arguments: a message naming the fix for each class path (``--model X``, ``--data X``,
    ``--trainer.callbacks+=X``, ``class_path:`` in ``--config`` files) whose module cannot be found."""
    found: list[tuple[str, str]] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        flag = flag.rstrip("+")
        if flag in ("--model", "--data", "--trainer.callbacks", "--optimizer", "--lr_scheduler"):
            if "." in value and not value.startswith(("{", "[")) and "/" not in value:
                found.append((flag, value))
        elif flag == "--config" and value and Path(value).is_file():
            import yaml

            try:
                cfg = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # LightningCLI reports a malformed config itself
            found += [("class_path in " + value, p) for p in _class_paths(cfg) if "." in p]
    out = []
    for flag, path in found:
        hint = missing_module_hint(path, flag)
        if hint is not None and hint not in out:
            out.append(hint)
    return out
