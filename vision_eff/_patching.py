"""The handle that records every change a technique makes to a model, and undoes it.

Rules every technique follows (see DESIGN.md):
- changes are made on *instances* only (an attribute, a bound forward, a hook, an
  attention processor), never on a class or a module-level name;
- every change goes through a :class:`PatchHandle`, which undoes them in reverse order,
  so ``remove()`` restores the model bit-exactly;
- an upstream forward is wrapped, never copied.

``apply(obj, *techniques)`` applies techniques and returns a :class:`Handle`; applying a
technique with the same ``key`` to the same model again first removes the earlier one.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from torch import nn

_MISSING = object()


class UnsupportedModelError(TypeError):
    """A technique cannot be applied to this model (the message says why and what to do)."""


@runtime_checkable
class Technique(Protocol):
    """A frozen config that can apply itself. ``key`` groups techniques that replace each other."""

    @property
    def key(self) -> str: ...

    def supports(self, obj: Any) -> str | None:
        """None when ``obj`` is supported, else the reason it is not."""

    def apply(self, obj: Any, handle: "PatchHandle") -> None: ...


class PatchHandle:
    """Records instance-level changes and undoes them in reverse order."""

    def __init__(self, target: Any, technique: Any = None):
        self.target = target
        self.technique = technique
        self._undo: list[Callable[[], None]] = []
        self.state: dict[str, Any] = {}  # per-application runtime state a technique may keep
        self.removed = False

    # --- recording primitives -------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)`` on the instance, restoring the exact previous state on undo."""
        if isinstance(obj, nn.Module) and name in obj._modules:
            old, where = obj._modules[name], "module"
        elif isinstance(obj, nn.Module) and name in obj._parameters:
            old, where = obj._parameters[name], "param"
        elif isinstance(obj, nn.Module) and name in obj._buffers:
            old, where = obj._buffers[name], "buffer"
        elif name in getattr(obj, "__dict__", {}):
            old, where = obj.__dict__[name], "dict"
        else:
            old, where = _MISSING, "absent"
        setattr(obj, name, value)

        def undo() -> None:
            if where == "absent":
                if isinstance(obj, nn.Module):
                    for store in (obj._modules, obj._parameters, obj._buffers):
                        store.pop(name, None)
                obj.__dict__.pop(name, None)
            elif where == "module":
                obj._modules[name] = old
            elif where == "param":
                obj._parameters[name] = old
            elif where == "buffer":
                obj._buffers[name] = old
            else:
                obj.__dict__[name] = old

        self._undo.append(undo)

    def wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Replace ``module.forward`` on this instance by ``make(original_bound_forward)``."""
        original = module.forward
        self.set_attr(module, "forward", make(original))

    def add_hook(self, removable: Any) -> None:
        """Record a torch hook handle (anything with ``.remove()``)."""
        self._undo.append(removable.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        if self.removed:
            return
        while self._undo:
            self._undo.pop()()
        self.removed = True


# model -> {technique key: PatchHandle}; weak so patched models can be garbage-collected
_ACTIVE: "weakref.WeakKeyDictionary[Any, dict[str, PatchHandle]]" = weakref.WeakKeyDictionary()


class Handle:
    """What :func:`apply` returns: ``remove()`` undoes every technique it applied."""

    def __init__(self, target: Any, parts: list[PatchHandle]):
        self.target = target
        self.parts = parts

    @property
    def techniques(self) -> list[Any]:
        return [p.technique for p in self.parts]

    def remove(self) -> None:
        for part in reversed(self.parts):
            part.remove()
            active = _ACTIVE.get(self.target)
            if active is not None and active.get(_key(part.technique)) is part:
                del active[_key(part.technique)]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(repr(t) for t in self.techniques)
        return f"Handle({type(self.target).__name__}: {names})"


def _key(technique: Any) -> str:
    return getattr(technique, "key", type(technique).__name__)


def apply(obj: Any, *techniques: Any) -> Handle:
    """Apply techniques to a model or pipeline in place; returns a handle whose ``remove()`` undoes them."""
    if not techniques:
        raise ValueError("apply() needs at least one technique, e.g. apply(model, TokenMerge(ratio=0.5))")
    for t in techniques:
        if not isinstance(t, Technique):
            raise TypeError(f"{t!r} is not a vision_eff technique (it needs key, supports() and apply())")
        why = t.supports(obj)
        if why is not None:
            raise UnsupportedModelError(f"{type(t).__name__} cannot be applied to {type(obj).__name__}: {why}")
    active = _ACTIVE.setdefault(obj, {})
    parts: list[PatchHandle] = []
    try:
        for t in techniques:
            previous = active.pop(_key(t), None)
            if previous is not None:
                previous.remove()
            part = PatchHandle(obj, t)
            try:
                t.apply(obj, part)
            except Exception:
                part.remove()
                raise
            active[_key(t)] = part
            parts.append(part)
    except Exception:
        Handle(obj, parts).remove()
        raise
    return Handle(obj, parts)


def remove(obj: Any) -> None:
    """Undo every technique currently applied to ``obj`` (newest first)."""
    active = _ACTIVE.pop(obj, {})
    for part in reversed(list(active.values())):
        part.remove()


def active_techniques(obj: Any) -> list[Any]:
    return [p.technique for p in _ACTIVE.get(obj, {}).values()]


@contextlib.contextmanager
def patched(obj: Any, *techniques: Any):
    """``with patched(model, TokenMerge(ratio=0.5)): ...`` applies on entry and removes on exit."""
    handle = apply(obj, *techniques)
    try:
        yield handle
    finally:
        handle.remove()


def denoiser_of(obj: Any) -> nn.Module:
    """The denoising network of a diffusers pipeline (``unet`` or ``transformer``), or the model itself."""
    for name in ("unet", "transformer"):
        m = getattr(obj, name, None)
        if isinstance(m, nn.Module):
            return m
    if isinstance(obj, nn.Module):
        return obj
    raise UnsupportedModelError(
        f"{type(obj).__name__} is neither a torch module nor a pipeline with a `unet` or `transformer`"
    )


def iter_modules(obj: Any, types: tuple[type, ...] | type) -> Iterable[tuple[str, nn.Module]]:
    for name, m in denoiser_of(obj).named_modules():
        if isinstance(m, types):
            yield name, m
