"""Where a gradient check's setup comes from: importing the target that names a factory, and
seeding the random generators so that a check gives the same numbers run after run.

A target is ``"package.module:function"`` (importable from the current directory, as under
``python -m``) or ``"path/to/file.py:function"`` (its directory goes on ``sys.path``, as under
``python file.py``). Every way it can fail is a :class:`~gradwatch.BadTargetError` whose message
says what was expected and what was found.

Seeding covers Python, numpy and the frameworks: those already imported at once, and one that the
factory imports inside the function as it finishes loading (an import hook), so a model's initial
weights are repeatable either way. No framework is imported here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import random
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from gradwatch.errors import BadTargetError


def describe(value: Any) -> str:
    if value is None:
        return "None (does the factory end with a `return`?)"
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value[:6]) + (", ..." if len(value) > 6 else "")
        return f"a {type(value).__name__} of {len(value)} items ({kinds})"
    text = repr(value)
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind} ({text[:60] + '...' if len(text) > 60 else text})"



def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise BadTargetError(f"No file {path!r} (from the current directory {os.getcwd()!r}). "
                             "Give the path of a .py file, or a module name: 'package.module:function'.")
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)  # its sibling modules import as they do under `python file.py`
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"gradwatch_target_{stem}_{abs(hash(os.path.abspath(path))):x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise BadTargetError(f"Cannot load {path!r} as a Python module; give a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise _exited(path, exc) from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        raise BadTargetError(f"Importing {path!r} raised {type(exc).__name__}: {exc}") from exc
    return module


def _exited(where: str, exc: SystemExit) -> BadTargetError:
    return BadTargetError(
        f"Importing {where!r} called sys.exit({exc.code!r}): it runs a script when imported (argparse?). "
        "Put the training script under `if __name__ == \"__main__\":` so the factory can be imported."
    )


def _import_module(name: str) -> ModuleType:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m`: modules of the current directory import
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise BadTargetError(
                f"Cannot import module {name!r} ({exc}). Give a module importable from the current "
                "directory ('package.module:function') or the path of a file ('path/to/file.py:function')."
            ) from exc
        raise BadTargetError(f"Importing {name!r} raised ModuleNotFoundError: {exc}") from exc
    except SystemExit as exc:
        raise _exited(name, exc) from exc
    except Exception as exc:
        raise BadTargetError(f"Importing {name!r} raised {type(exc).__name__}: {exc}") from exc


def load_target(target: str) -> Callable[[], Any]:
    """Import the factory a target names.

    Args:
        target: ``"package.module:function"`` or ``"path/to/file.py:function"``.

    Returns:
        The factory.

    Raises:
        BadTargetError: for a malformed target, a module or file that does not import, or a
            function that is missing or not callable.
    """
    where, sep, func_name = str(target).rpartition(":")
    if not sep or not where or not func_name.isidentifier():
        raise BadTargetError(
            f"Expected a target of the form 'package.module:function' or 'path/to/file.py:function'; "
            f"received {target!r}."
        )
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    module = _import_file(where) if is_file else _import_module(where)
    factory = getattr(module, func_name, None)
    if factory is None:
        defined = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        listing = f"; it defines {', '.join(defined[:12])}" if defined else ""
        raise BadTargetError(f"{where!r} has no function {func_name!r}{listing}.")
    if not callable(factory):
        raise BadTargetError(f"{where}:{func_name} is {describe(factory)}, not a function that returns a setup.")
    return factory



_SEEDED_FRAMEWORKS = ("torch", "keras", "tensorflow")


def _seed_framework(name: str, module: Any, seed: int) -> None:
    if name == "torch" and hasattr(module, "manual_seed"):
        module.manual_seed(seed)
    elif name == "keras" and hasattr(getattr(module, "utils", None), "set_random_seed"):
        module.utils.set_random_seed(seed)
    elif name == "tensorflow" and hasattr(getattr(module, "random", None), "set_seed"):
        module.random.set_seed(seed)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and every already-imported framework's random generators.

    Only frameworks already imported are seeded (``sys.modules``); none is imported here.

    Args:
        seed: The seed.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    for name in _SEEDED_FRAMEWORKS:
        if name in sys.modules:
            _seed_framework(name, sys.modules[name], seed)


class _SeedOnImport(importlib.abc.MetaPathFinder):
    """Seeds a framework the moment it is first imported (by a factory that imports it inside the
    function), so its model's initial weights are as repeatable as those of a module-level import."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _SEEDED_FRAMEWORKS or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module, seed = loader.exec_module, self.seed

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _seed_framework(fullname, module, seed)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed everything now and every framework imported inside the ``with`` block.

    Args:
        seed: The seed; None does nothing.
    """
    if seed is None:
        yield
        return
    seed_everything(seed)
    finder = _SeedOnImport(seed)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
