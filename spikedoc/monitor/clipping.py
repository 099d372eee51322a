"""Observes the training loop's own gradient clipping (`torch.nn.utils.clip_grad_norm_`) while a monitor is attached.

Most loops call `clip_grad_norm_(model.parameters(), max_norm)` between `backward()` and
`optimizer.step()`. The monitor needs to see that call: the gradient norm it records is the norm
*before* clipping, and analysis needs to know that clipping was in use and at which max norm.

Where it looks: every norm clip in torch ends in one function that applies the coefficient, given
the parameters, the max norm and the total norm (`torch.nn.utils.clip_grad._clip_grads_with_norm_`,
public as `torch.nn.utils.clip_grads_with_norm_` since torch 2.6; `clip_grad_norm_` and the
deprecated `clip_grad_norm` call it). Before torch 2.6 `clip_grad_norm_` does everything itself and
is observed instead. Observers are told before the call (the gradients are still unclipped) and
after it (with the total norm the clip used).

How: these functions are `torch.no_grad` wrappers around an inner function held in a closure cell.
Replacing the cell's content changes what the one function object runs, so a loop that did
`from torch.nn.utils import clip_grad_norm_` before `watch()` is observed as well as one calling
`torch.nn.utils.clip_grad_norm_`. Rebinding module attributes would miss the early import; gradient
hooks would need a norm pass per backward and cannot tell clipping from a GradScaler's unscale_.
The cell is restored when the last monitor detaches. Where a torch version has no such cell, the
module attributes are rebound instead (and an early import goes unobserved, logged once).

The arguments are passed on unchanged (a generator of parameters as the list it yields): the clip
computes exactly what it would without a monitor.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn.utils import clip_grad as _clip_grad

__all__ = ["ClipObserver", "observe", "unobserve"]

logger = logging.getLogger(__name__)


class ClipObserver(Protocol):
    """What is told about each norm clip of the training loop. Implementations must not raise."""

    def before_clip(self, params: list[Tensor], max_norm: float) -> None:
        """The loop is about to clip the gradients of `params` to `max_norm` (still unclipped)."""

    def after_clip(self, params: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
        """The clip is done; `total_norm` is the norm it computed (a device tensor, not read)."""


_lock = threading.Lock()
_observers: weakref.WeakSet[Any] = weakref.WeakSet()
_undo: Callable[[], None] | None = None


def observe(observer: ClipObserver) -> None:
    """Tell `observer` about every norm clip from now on (until `unobserve`)."""
    global _undo
    with _lock:
        _observers.add(observer)
        if _undo is None:
            _undo = _install()


def unobserve(observer: ClipObserver) -> None:
    """Stop telling `observer`; the last one restores torch's functions. Idempotent."""
    global _undo
    with _lock:
        _observers.discard(observer)
        if not _observers and _undo is not None:
            _undo()
            _undo = None


def _target() -> tuple[Callable[..., Any], str, bool]:
    """The function every norm clip goes through, its public name, and whether it is given the total norm."""
    with_norm = getattr(_clip_grad, "_clip_grads_with_norm_", None)  # torch >= 2.6
    if with_norm is not None:
        return with_norm, "clip_grads_with_norm_", True
    return _clip_grad.clip_grad_norm_, "clip_grad_norm_", False


def _install() -> Callable[[], None]:
    fn, public, given_total = _target()
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is not None and closure and "func" in code.co_freevars:
        cell = closure[code.co_freevars.index("func")]
        inner = cell.cell_contents
        if callable(inner) and getattr(inner, "__name__", None) == fn.__name__:
            cell.cell_contents = _observed(inner, given_total)

            def undo() -> None:
                cell.cell_contents = inner

            return undo
    # No closure to patch in this torch: rebind the names (a name imported before watch() is missed).
    logger.info("spikedoc: %s has no inner function to observe; observing the module attributes", fn.__name__)
    wrapped = _observed(fn, given_total)
    homes = [(_clip_grad, fn.__name__), (torch.nn.utils, public)]
    if not given_total:
        homes.append((torch.nn.utils, "clip_grad_norm_"))
    saved = [(module, name, getattr(module, name)) for module, name in homes if getattr(module, name, None) is fn]
    for module, name, _ in saved:
        setattr(module, name, wrapped)

    def restore() -> None:
        for module, name, original in saved:
            setattr(module, name, original)

    return restore


def _observed(inner: Callable[..., Any], given_total: bool) -> Callable[..., Any]:
    """`inner` with the observers told before and after each call."""

    @functools.wraps(inner)
    def observed(*args: Any, **kwargs: Any) -> Any:
        watchers = list(_observers)
        if not watchers:
            return inner(*args, **kwargs)
        args, kwargs, params, max_norm = _arguments(args, kwargs)
        if params is None:  # a call torch itself will reject: let it
            return inner(*args, **kwargs)
        for w in watchers:
            w.before_clip(params, max_norm)
        result = inner(*args, **kwargs)
        total = (args[2] if len(args) > 2 else kwargs.get("total_norm")) if given_total else result
        if isinstance(total, Tensor):
            for w in watchers:
                w.after_clip(params, max_norm, total)
        return result

    return observed


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], list[Tensor] | None, float]:
    """The call's arguments (a parameter generator turned into its list), its parameters and max norm."""
    try:
        parameters = args[0] if args else kwargs["parameters"]
        max_norm = float(args[1] if len(args) > 1 else kwargs["max_norm"])
    except (KeyError, IndexError, TypeError, ValueError):
        return args, kwargs, None, math.nan
    if isinstance(parameters, Tensor):
        return args, kwargs, [parameters], max_norm
    try:
        params = list(parameters)  # a generator is consumed once: the clip gets the list instead
    except TypeError:  # not iterable: torch's own error is the one to see
        return args, kwargs, None, max_norm
    if args:
        args = (params, *args[1:])
    else:
        kwargs = {**kwargs, "parameters": params}
    return args, kwargs, params, max_norm
