"""When to compute in full and when to reuse: the decision shared by the UNet and transformer caches.

State is kept per *slot*: the k-th model call within one loop iteration (one slot when guidance runs
cond and uncond in one batch, as diffusers pipelines do; two when a caller runs them separately), so
a cache is only ever reused by the call that filled it. A slot is reset by a new run (the clock) or a
change of input shape, dtype or device.

Fixed interval: the decision is host arithmetic on the loop index (no tensor is read). Adaptive
(``threshold``): the decision is per sample and made with tensor ops (relative L1 drift of a probe since
that sample's last full step, or a gap of ``interval`` steps); the one host read per model call is
"does any sample need a full step", which is what lets skipped work be skipped. When only some samples
need it, all are computed and the others get their cached values back (``torch.where``), so every
sample's result is independent of the rest of the batch.
"""
from __future__ import annotations

from typing import Any

import torch


def blend(mask: torch.Tensor | None, new: Any, old: Any) -> Any:
    """``new`` where ``mask`` (per sample) else ``old``, through tuples; ``mask=None`` keeps ``new``."""
    if mask is None or old is None:
        return new
    if torch.is_tensor(new) and torch.is_tensor(old) and new.dim() and new.shape[0] == mask.shape[0]:
        return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old):
        return type(new)(blend(mask, a, b) for a, b in zip(new, old))
    return new


def _map(fn, *xs: Any) -> Any:
    """``fn`` over the tensors (with a batch dimension) of ``xs``, through tuples; other items from the first."""
    x0 = xs[0]
    if torch.is_tensor(x0):
        return fn(*xs) if x0.dim() else x0
    if isinstance(x0, (tuple, list)):
        return type(x0)(_map(fn, *items) for items in zip(*xs))
    return x0


def push_history(entry: tuple | None, value: Any, index: int, mask: torch.Tensor | None) -> tuple:
    """Per-sample history ``(i_b, f_b, i_a, f_a)`` of a cached feature after a full step at ``index``
    (only the samples in ``mask`` when it is a partial one)."""
    t = value if torch.is_tensor(value) else next(x for x in value if torch.is_tensor(x))
    step = torch.full((t.shape[0],), float(index), device=t.device)
    if entry is None:
        return step, value, step, value
    new = (step, value, entry[0], entry[1])
    return tuple(blend(mask, n, o) for n, o in zip(new, entry))


def extrapolate(entry: tuple, index: int) -> Any:
    """First-order estimate at ``index``: ``f_b + (f_b - f_a) * (index - i_b) / (i_b - i_a)`` per sample."""
    ib, fb, ia, fa = entry
    scale = (index - ib) / (ib - ia).clamp_min(1)  # 0 until two full steps are known (then f_a is f_b)
    return _map(lambda b, a: b + (b - a) * scale.view(-1, *([1] * (b.dim() - 1))).to(b.dtype), fb, fa)


class Slot:
    def __init__(self, signature: Any) -> None:
        self.signature = signature
        self.store: dict[Any, Any] = {}  # UNet: cached output per replayed module
        self.residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ib, rb, ia, ra
        self.last_full: int | None = None  # host: last step any sample was computed
        self.last: torch.Tensor | None = None  # per sample: last full step (adaptive)
        self.ref: torch.Tensor | None = None  # per sample: probe at the last full step (adaptive)
        self.full: bool | None = None  # this call: run the cached modules? (None: not decided yet)
        self.mask: torch.Tensor | None = None  # this call: which samples are full (None: all or none)
        self.index = 0


class Schedule:
    def __init__(self, cfg: Any, clock: Any) -> None:
        self.cfg, self.clock = cfg, clock
        self.run: int | None = None
        self.step: int | None = None
        self.calls = 0
        self.slots: dict[int, Slot] = {}
        self.log: list[tuple[int, int, bool]] = []  # (step, slot, computed) of the current run

    def start(self, signature: Any) -> Slot:
        """Called before each model call; decides at once unless the adaptive rule needs the probe."""
        i = self.clock.index
        if self.clock.run != self.run:
            self.run, self.step, self.slots, self.log = self.clock.run, None, {}, []
        self.calls = self.calls + 1 if i == self.step else 0
        self.step = i
        slot = self.slots.get(self.calls)
        if slot is None or slot.signature != signature:
            slot = self.slots[self.calls] = Slot(signature)
        slot.index, slot.mask = i, None
        cfg = self.cfg
        forced = slot.last_full is None or i < cfg.warmup or i <= slot.last_full
        if cfg.threshold is None:
            if cfg.full_steps is not None and i <= cfg.full_steps[-1]:
                forced = forced or i in cfg.full_steps
            else:
                forced = forced or i - slot.last_full >= cfg.interval
        slot.full = True if forced else (False if cfg.threshold is None else None)
        if slot.full is not None:
            self._record(slot)
        return slot

    def decide(self, slot: Slot, probe: torch.Tensor | None) -> bool:
        """The adaptive decision from ``probe`` (when pending); keeps the probe of full samples."""
        if slot.full is None:
            ref = slot.ref
            drift = (probe - ref).abs().flatten(1).mean(1) / ref.abs().flatten(1).mean(1).clamp_min(1e-12)
            mask = (drift >= self.cfg.threshold) | (slot.index - slot.last >= self.cfg.interval)
            slot.full = bool(mask.any())
            if slot.full:
                slot.mask = mask
                slot.ref = torch.where(mask.view(-1, *([1] * (probe.dim() - 1))), probe, ref)
                slot.last = torch.where(mask, slot.index, slot.last)
            self._record(slot)
        elif slot.full and probe is not None and slot.mask is None and slot.ref is not probe:
            slot.ref = probe
            slot.last = torch.full((probe.shape[0],), slot.index, dtype=torch.long, device=probe.device)
        return slot.full

    def _record(self, slot: Slot) -> None:
        if slot.full:
            slot.last_full = slot.index
        self.log.append((slot.index, self.calls, slot.full))
