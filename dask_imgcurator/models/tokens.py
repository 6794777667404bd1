"""Tokens of user-supplied factories that are the same in every process and every session.

dask tokenizes a function or class that cannot be pickled by reference (one defined in a script's
``__main__`` or a notebook, or a function that refers to such a class) with cloudpickle, whose
output holds an id drawn afresh in each process: the token of a run using a custom model or head
would differ at every start, so the run could never be resumed or repeated. Here a factory is
known by its code instead, plus whatever it closes over.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from dask.base import tokenize


def stable_token(obj: Any) -> str:
    """A token of ``obj`` (a function, class, ``functools.partial`` or other object) that does not
    change between processes: for functions and classes, their module, name and source, with a
    function's defaults, closure and the functions and classes of its own module that it names.

    >>> def double(x):
    ...     return 2 * x
    >>> stable_token(double) == stable_token(double)
    True
    """
    return _token(obj, set())


def _token(obj: Any, seen: set[int]) -> str:
    if id(obj) in seen:  # recursion between functions of one module
        return "seen"
    if isinstance(obj, functools.partial):
        return tokenize("partial", _token(obj.func, seen), [_token(a, seen) for a in obj.args],
                        {k: _token(v, seen) for k, v in sorted(obj.keywords.items())})
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return tokenize(obj)
    try:
        source = inspect.getsource(obj)
    except Exception:  # noqa: BLE001 - no source (built in C, typed at a prompt, exec'd text whose
        return tokenize(obj)  # file name is another file's): dask's own token
    seen = seen | {id(obj)}
    parts = [obj.__module__, obj.__qualname__, source]
    if inspect.isfunction(obj):
        cells = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
        named = [obj.__globals__[name] for name in obj.__code__.co_names
                 if name in obj.__globals__ and _own_code(obj.__globals__[name], obj.__module__)]
        parts += [_token(value, seen) for value in (*(obj.__defaults__ or ()), *cells, *named)]
        parts.append(_token(obj.__kwdefaults__ or {}, seen))
    return tokenize(*parts)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a name assigned after the function was made)
        return False
    return True


def _own_code(value: Any, module: str) -> bool:
    """Whether ``value`` is a function or class defined in ``module`` (a helper of the factory)."""
    return (inspect.isfunction(value) or inspect.isclass(value)) and getattr(value, "__module__", None) == module
