"""The public API's annotations resolve (IDEs and type checkers read them), and the
package says it is typed."""

import inspect
import os
import typing

import lowrank_ext as lx

METHODS = ("__init__", "from_linear", "from_factors", "to_linear", "merge", "unmerge")


def _callables():
    for name in lx.__all__:
        obj = getattr(lx, name)
        if inspect.isclass(obj):
            for method in METHODS:
                if method in vars(obj):
                    yield f"{name}.{method}", vars(obj)[method]
        elif callable(obj):
            yield name, obj


def test_public_annotations_resolve():
    annotated = 0
    for name, fn in _callables():
        fn = getattr(fn, "__func__", fn)
        hints = typing.get_type_hints(inspect.unwrap(fn))
        annotated += bool(hints)
    assert annotated >= 20


def test_py_typed_marker_ships():
    assert os.path.isfile(os.path.join(os.path.dirname(lx.__file__), "py.typed"))
