"""``"module:function"`` names resolved to Python objects: the user's rules, costs and judges
from the config, and the stage recipes the command line runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """Resolve "module:function" to a callable.

    Every failure becomes a one-line ValueError naming `what` and the spec, because these specs
    come from config files and a traceback deep inside importlib tells the user little.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f'{what} "{spec}": expected "module:function"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f'{what} "{spec}": cannot import module "{module_name}": {exc}') from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f'{what} "{spec}": module "{module_name}" has no attribute "{attr}"'
            ) from None
    if not callable(obj):
        raise ValueError(f'{what} "{spec}": "{attr}" is not callable')
    return obj
