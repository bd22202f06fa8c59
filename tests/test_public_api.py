"""The public surface of ``fmaml``: ``__all__`` is complete, sorted, importable and documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

import fmaml


def test_all_is_sorted_and_unique():
    assert list(fmaml.__all__) == sorted(fmaml.__all__)
    assert len(set(fmaml.__all__)) == len(fmaml.__all__)


@pytest.mark.parametrize("name", fmaml.__all__)
def test_every_public_name_imports(name):
    module = importlib.import_module("fmaml")
    assert hasattr(module, name), f"fmaml.__all__ lists {name!r} but fmaml has no such attribute"
    namespace: dict[str, object] = {}
    exec(f"from fmaml import {name}", namespace)
    assert namespace[name] is getattr(fmaml, name)


@pytest.mark.parametrize("name", fmaml.__all__)
def test_public_callables_have_docstrings(name):
    obj = getattr(fmaml, name)
    if not callable(obj):
        return
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"fmaml.{name} has no docstring"
    if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__"):
        # a dataclass without its own docstring gets the generated "Name(field: type, ...)"
        assert not doc.startswith(f"{obj.__name__}("), f"fmaml.{name} has only the generated doc"


def test_public_names_are_the_documented_ones():
    # the core of the package: the scan, its policies and its statistics
    for name in ("scan", "record_scan", "ScanStats", "StoreAll", "Uniform", "Binomial", "Auto"):
        assert name in fmaml.__all__
    assert isinstance(fmaml.__version__, str)


def test_public_objects_are_defined_in_private_modules():
    for name in fmaml.__all__:
        module = getattr(getattr(fmaml, name), "__module__", "") or ""
        if module.startswith("fmaml"):
            assert module.split(".")[1].startswith("_"), f"fmaml.{name} lives in {module}"
