"""The layout of docs/design.md, checked: dependencies point from the adapters to the core and
never back, there are no import cycles, each package pins what it exports, and the modules of
before the packages still import (with a deprecation warning)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "lightning", "transformers", "matplotlib", "tensorboard", "wandb")


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by its import name (integrations/ ships as gradwatch.integrations)."""
    found = {}
    for base, prefix in ((ROOT / "gradwatch", "gradwatch"), (ROOT / "integrations", "gradwatch.integrations")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def module_level_imports(name: str, path: pathlib.Path) -> set[str]:
    """What a module imports when it is imported: top-level statements, not those inside functions
    (imported on use) nor under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                out.add(target)
                out.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports on import. Importing a submodule runs its parent
    packages first, which Python handles (the parent is partly initialised): edges to a module's
    own ancestors are left out."""
    mods = modules()

    def ancestor(m: str, of: str) -> bool:
        return m == of or of.startswith(m + ".")

    return {name: {m for m in module_level_imports(name, path) if m in mods and not ancestor(m, name)}
            for name, path in mods.items()}


def test_the_core_never_imports_an_adapter_or_a_framework_on_import():
    mods = modules()
    for name, path in mods.items():
        if name.startswith("gradwatch.integrations"):
            continue
        imported = module_level_imports(name, path)
        assert not any(m.startswith("gradwatch.integrations") for m in imported), name
        assert not any(m.split(".")[0] in FRAMEWORKS for m in imported), (name, sorted(imported))


def test_no_import_cycles():
    edges = graph()
    done: set[str] = set()

    def walk(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            walk(nxt, [*stack, node])
        done.add(node)

    for name in sorted(edges):
        walk(name, [])


def test_the_adapters_do_not_import_each_other_except_through_torch():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("gradwatch.integrations.keras"):
            assert not any(t.startswith(("gradwatch.integrations.torch", "gradwatch.integrations.lightning",
                                         "gradwatch.integrations.transformers")) for t in targets), name


SINKS = ["JsonlSink", "LoggingSink", "Sink", "TensorBoardSink", "WandbSink", "WarnOnceSink", "group_layers",
         "grouped_grad_norms", "read_jsonl", "resolve_sinks", "step_scalars"]


def test_package_exports_are_pinned():
    import gradwatch.check
    import gradwatch.report
    import gradwatch.sinks

    assert sorted(gradwatch.sinks.__all__) == SINKS
    assert sorted(gradwatch.report.__all__) == ["FAIL_ON", "Report", "SCHEMA_VERSION", "check_fail_on"]
    assert {"CheckSpec", "run_check", "check_target", "Progress"} <= set(gradwatch.check.__all__)
    for package in (gradwatch.sinks, gradwatch.report, gradwatch.check):
        for name in package.__all__:
            if name not in ("TensorBoardSink", "WandbSink"):  # lazy: they import their framework
                assert getattr(package, name) is not None


def test_the_lazy_sinks_import_their_framework_only_when_used():
    code = "import sys, gradwatch.sinks; print([m for m in ('tensorboard', 'wandb') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old", sorted(__import__("gradwatch.moved", fromlist=["MOVED"]).MOVED))
def test_old_module_paths_import_the_new_module_with_a_warning(old):
    from gradwatch.moved import MOVED

    new = MOVED[old]
    if new.endswith(("tensorboard", "wandb", "torch.demo")):
        pytest.importorskip(new.rsplit(".", 1)[-1] if not new.endswith("demo") else "torch")
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
