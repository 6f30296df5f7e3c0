"""The docstring examples of the package (outside the torch lab) run as doctests."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import robustpatch

#: Sub-packages whose modules need the torch extra; their examples run in the lab tests.
SKIPPED = ("robustpatch.lab",)

#: Modules whose docstrings must hold examples (the public entry points).
WITH_EXAMPLES = (
    "robustpatch",
    "robustpatch.targets",
    "robustpatch.validate",
    "robustpatch.signature.model",
    "robustpatch.signature.algebra",
    "robustpatch.signature.entry",
)


def _module_names(package: ModuleType) -> list[str]:
    """Every module under ``package`` outside :data:`SKIPPED`, found without importing
    the skipped sub-packages."""
    names = [package.__name__]
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.startswith(SKIPPED):
            continue
        if info.ispkg:
            names += _module_names(importlib.import_module(info.name))
        else:
            names.append(info.name)
    return names


MODULES = _module_names(robustpatch)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file leaves nothing behind
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_public_modules_have_examples(name):
    finder = doctest.DocTestFinder()
    tests = finder.find(importlib.import_module(name))
    assert sum(len(t.examples) for t in tests) > 0, name
