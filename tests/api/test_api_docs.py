"""docs/api.md documents every public name of loft's public modules.

A name is documented when a heading of ``docs/api.md`` holds its public import path in
backticks, for example::

    ### `loft.optim.DifferentiableOptimizer.step`

The public names are found by walking the modules, not listed here: a module's
``__all__`` (or, without one, the attributes it defines itself whose names do not start
with an underscore), and for each public class the functions, properties, class methods
and static methods whose names do not start with an underscore, defined on it or on one
of loft's own classes it derives from (``FunctionalModule.is_root`` comes from a private
base). Data attributes (dataclass fields, class constants) are described in their class's
section and not checked. An object exported under several paths
(``loft.get_diff_optim`` is ``loft.optim.get_diff_optim``) is documented by any one of
them, and a method by its class or by a public loft class it inherits it from
(``DifferentiableSGD.step`` by ``DifferentiableOptimizer.step``).

The version policy of CHANGELOG.md is checked here too: ``loft.__version__`` and
setup.py's version agree, and the changelog has a section for it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
CHANGELOG = ROOT / "CHANGELOG.md"

#: The modules whose public names docs/api.md must document.
MODULES = ("loft", "loft.optim", "loft.patch", "loft.utils", "loft.unroll", "loft.distributed",
           "loft.bench")

_MEMBER_KINDS = (property, classmethod, staticmethod, functools.cached_property)


def _public_names(module: ModuleType) -> list[str]:
    """``__all__``, or the public attributes ``module`` defines itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, ModuleType)
            and getattr(value, "__module__", None) == module.__name__]


def _is_member(value: Any) -> bool:
    return inspect.isfunction(value) or isinstance(value, _MEMBER_KINDS)


def _loft_classes(cls: type) -> list[type]:
    """``cls`` and the classes of loft it derives from, in method resolution order."""
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "loft"]


def required_entries() -> dict[str, set[str]]:
    """Every public name, as ``{canonical path: every path that documents it}``."""
    paths: dict[int, list[str]] = {}  # id(object) -> its public paths, in walk order
    objects: dict[int, Any] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        objects[id(module)] = module
        paths.setdefault(id(module), []).append(module_name)
        for name in _public_names(module):
            value = getattr(module, name)
            objects[id(value)] = value
            path = value.__name__ if isinstance(value, ModuleType) else f"{module_name}.{name}"
            if path not in paths.setdefault(id(value), []):
                paths[id(value)].append(path)
    public_classes = {key: value for key, value in objects.items() if inspect.isclass(value)}
    entries: dict[str, set[str]] = {}
    for key, value in objects.items():
        # Named in failures by its deepest path: loft.optim.get_diff_optim, not loft.'s.
        canonical = max(paths[key], key=lambda path: path.count("."))
        entries[canonical] = set(paths[key])
        if key not in public_classes:
            continue
        members = {name for c in _loft_classes(value) for name, member in vars(c).items()
                   if not name.startswith("_") and _is_member(member)}
        for name in sorted(members):
            accepted = {f"{path}.{name}"
                        for owner in value.__mro__ if id(owner) in public_classes
                        and hasattr(owner, name) for path in paths[id(owner)]}
            entries[f"{canonical}.{name}"] = accepted
    return entries


def documented_paths(text: str) -> set[str]:
    """The backticked paths in the headings of a markdown text (``()`` after one ignored)."""
    found = set()
    for line in text.splitlines():
        if line.startswith("#"):
            found.update(token.removesuffix("()") for token in re.findall(r"`([^`]+)`", line))
    return found


def missing_entries(text: str) -> list[str]:
    """The public names that no heading of ``text`` documents."""
    documented = documented_paths(text)
    return sorted(path for path, accepted in required_entries().items()
                  if not accepted & documented)


def _failure(missing: list[str]) -> str:
    return (f"{len(missing)} public name(s) of {', '.join(MODULES)} have no heading in "
            f"docs/api.md (add a section whose heading holds the path in backticks, e.g. "
            f"### `loft.optim.DifferentiableOptimizer.step`):\n  " + "\n  ".join(missing))


def test_every_public_name_is_documented() -> None:
    missing = missing_entries(API_DOC.read_text())
    assert not missing, _failure(missing)


def test_the_check_sees_a_missing_name() -> None:
    """The positive control: the same document without the heading of
    ``DifferentiableOptimizer.step`` fails, naming it (by its deepest public path) and
    the optimisers that inherit it."""
    path = "loft.optim.DifferentiableOptimizer.step"
    lines = API_DOC.read_text().splitlines()
    cut = [line for line in lines if not (line.startswith("#") and f"`{path}`" in line)]
    assert len(cut) == len(lines) - 1, f"expected one heading of {path} in docs/api.md"
    missing = missing_entries("\n".join(cut))
    assert path in missing, missing
    assert "loft.optim.DifferentiableSGD.step" in missing, missing
    assert all(name.endswith(".step") for name in missing), missing


def test_the_walk_finds_names_of_each_kind() -> None:
    """The walk reaches functions, classes, methods, properties, inherited members of a
    private base, and names exported from a package's ``__init__``."""
    entries = required_entries()
    for path in ("loft.innerloop_ctx", "loft.optim.DifferentiableSGD",
                 "loft.optim.DifferentiableOptimizer.step",
                 "loft.optim.DifferentiableOptimizer.state",
                 "loft.patch.FunctionalModule.is_root", "loft.bench.SuiteResult.load",
                 "loft.utils.flatten", "loft.unroll.unroll"):
        assert path in entries, f"{path} not found by the walk"
    assert "loft.optim.DifferentiableOptimizer.step" in entries[
        "loft.optim.DifferentiableSGD.step"]
    assert entries["loft.optim.get_diff_optim"] == {"loft.get_diff_optim",
                                                    "loft.optim.get_diff_optim"}


def _setup_version() -> str:
    """The ``version=`` literal of setup.py's ``setup(...)`` call."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "version":
                    return ast.literal_eval(keyword.value)
    raise AssertionError("setup.py: no setup(version=...) found")


def test_the_version_is_stated_once_in_each_place() -> None:
    """CHANGELOG.md's policy: ``loft.__version__`` and setup.py's version agree, and the
    changelog has a section for that version."""
    import loft

    assert loft.__version__ == _setup_version(), (
        f"python/loft/__init__.py says {loft.__version__}, setup.py says "
        f"{_setup_version()}: bump both (CHANGELOG.md, Versions)")
    headings = [line for line in CHANGELOG.read_text().splitlines() if line.startswith("## ")]
    assert any(line.split()[1] == loft.__version__ for line in headings), (
        f"CHANGELOG.md has no '## {loft.__version__} (date)' section")
