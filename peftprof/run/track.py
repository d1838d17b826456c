"""Tensor-level memory tracking on CPU (and on fake tensors): every storage an op creates, when it dies,
and what it turned out to be, so a peak can be split into the estimator's categories.

Why not torch's MemTracker (torch.distributed._tools.mem_tracker): it is private API, attributes memory
per module rather than by what a tensor *became* (a gradient, an optimizer state, a saved activation,
logits), needs a subclass to skip frozen parameters, and gives no phase timeline. This is the same
mechanism (a TorchDispatchMode plus weak references on untyped storages) in ~150 lines.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from ..results import CATEGORIES

PHASES = ("forward", "backward", "optimizer")


class SimulatedOOM(MemoryError):
    """Raised when tracked memory would exceed the cap (`--max-memory` on CPU)."""


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# op overload -> whether any output can be a new storage. aten::lift_fresh returns an alias of its input by
# schema, yet that input is new: torch.tensor(data) builds its storage below the Python dispatcher and then
# calls lift_fresh so that modes see the fresh tensor (torch/_subclasses/fake_tensor.py handles it as a
# constructor for the same reason). Found by the MemTracker cross-check (issue #12).
_FRESH: dict = {torch.ops.aten.lift_fresh.default: True}


def storages_of(t: torch.Tensor) -> list:
    """Untyped storages behind a tensor, looking through wrapper subclasses (quanto's QTensors)."""
    if type(t) in _PLAIN:
        return [t.untyped_storage()]
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        # DTensor (FSDP2 parameters) also flattens to its device_mesh, which holds no storage
        return [st for a in attrs if torch.is_tensor(v := getattr(t, a)) for st in storages_of(v)]
    return [t.untyped_storage()]


@dataclass(slots=True)
class _Alloc:
    nbytes: int
    phase: str
    index: int  # event index of the allocation
    freed_phase: str | None = None
    category: str | None = None  # fixed for pre-registered storages
    shape: tuple | None = None  # of the tensor that created the storage (for the timeline and attribution)
    dtype: object = None
    where: str | None = None  # module path (forward, recomputation) or autograd node (backward)


@dataclass
class TrackResult:
    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]  # at the peak moment
    phase_peaks: dict[str, int]
    steady_bytes: int  # live at the end


@dataclass
class MemoryTracker(TorchDispatchMode):
    """Dispatch mode that records every new storage and its death. Set `.phase` as the step proceeds."""

    cap_bytes: int | None = None
    vocab_size: int | None = None
    logits_ndim: int | None = None  # an image classifier's logits are (batch, num_labels): 2 (None: any rank >= 2)
    phase: str = "setup"
    allocs: dict[int, _Alloc] = field(default_factory=dict)
    events: list[tuple[int, int]] = field(default_factory=list)  # (uid, +1 alloc / -1 free)
    live_bytes: int = 0
    # frees that happened on another thread than the tracked step's: their moment is that thread's, not the step's
    # program order (gloo's worker thread dropping a collective's buffer, run/distributed.py wait_released)
    off_thread_frees: int = 0

    def __post_init__(self):
        super().__init__()
        self._thread: int | None = None  # the tracked step's thread (set on entering)
        self._uids = itertools.count()
        self._seen: dict[int, int] = {}  # live storage (StorageImpl address, _cdata) -> uid
        self._refs: dict[int, weakref.ref] = {}  # uid -> weak reference whose callback records the free
        self._logit_uids: set[int] = set()
        self._roles: dict[int, str] = {}
        self.roles: dict[int, str] = {}  # uid -> category, set by classify
        # module attribution (peftprof/timeline.py): forward hooks keep a stack of module paths while tracking
        self._stack: list[str] = []
        self._root = None
        self._names: dict[int, str] = {}
        self._hooks: tuple = ()
        self._depth = 0

    def __enter__(self):
        # re-entered from __torch_dispatch__ for wrapper subclasses: the hooks are installed once
        if self._depth == 0:
            self._thread = threading.get_ident()
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._hooks = (register_module_forward_pre_hook(self._enter_module),
                           register_module_forward_hook(self._exit_module, always_call=True))
            self._resize, tracker = torch.UntypedStorage.resize_, self

            def resize_(st, size):  # not an aten op: no dispatch mode sees it (torch's MemTracker patches it too)
                out = tracker._resize(st, size)
                tracker.resized(st)
                return out

            torch.UntypedStorage.resize_ = resize_
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for h in self._hooks:
                h.remove()
            self._hooks = ()
            torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def _enter_module(self, module, args):
        if self._root is None:
            self._set_root(module)
        name = self._names.get(id(module))
        self._stack.append(type(module).__name__ if name is None else name)

    def _exit_module(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def _set_root(self, root) -> None:
        """The first module called: name every module and the storages of its parameters and buffers."""
        self._root = root
        self._names = {id(m): _short(n) for n, m in root.named_modules(remove_duplicate=False)}
        for n, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
            self._name_storages(t, _short(n.rpartition(".")[0]))

    def _name_storages(self, t, where: str) -> None:
        for st in storages_of(t):
            uid = self._seen.get(st._cdata)
            if uid is not None and self.allocs[uid].where is None:
                self.allocs[uid].where = where

    def _add(self, st, category: str | None = None, is_logits: bool = False, t=None, where=None) -> int | None:
        key = st._cdata
        if key in self._seen:
            return None
        uid = next(self._uids)
        self._seen[key] = uid
        nbytes = st.nbytes()
        self.allocs[uid] = _Alloc(nbytes=nbytes, phase=self.phase, index=len(self.events), category=category,
                                  shape=None if t is None else t.shape, dtype=None if t is None else t.dtype,
                                  where=where)
        self.events.append((uid, 1))
        self.live_bytes += nbytes
        if is_logits:
            self._logit_uids.add(uid)
        # weakref.ref (not finalize: ~3x cheaper on this hot path); torch keeps a storage's Python object
        # alive exactly as long as the storage, so the callback marks the free
        self._refs[uid] = weakref.ref(st, lambda _, uid=uid, key=key: self._free(uid, key))
        if self.cap_bytes is not None and category is None and self.live_bytes > self.cap_bytes:
            raise SimulatedOOM(f"tracked memory {self.live_bytes:,} B exceeds the cap {self.cap_bytes:,} B")
        return uid

    def _free(self, uid: int, key: int) -> None:
        self._refs.pop(uid, None)
        if self._seen.get(key) == uid:
            del self._seen[key]
        a = self.allocs.get(uid)
        if a is None or a.freed_phase is not None:
            return
        a.freed_phase = self.phase
        if self._thread is not None and threading.get_ident() != self._thread:
            self.off_thread_frees += 1
        self.events.append((uid, -1))
        self.live_bytes -= a.nbytes

    def resized(self, st) -> None:
        """A storage resized in place: FSDP2 allocates and frees unsharded parameters this way
        (fsdp/_fully_shard/_fsdp_param.py alloc_storage/free_storage). The old size dies and the new one is born,
        keeping a registered category (an unsharded weight stays a weight)."""
        uid = self._seen.get(st._cdata)
        old = None if uid is None else self.allocs[uid]
        if uid is not None:
            self._free(uid, st._cdata)
        if st.nbytes():
            new = self._add(st, old and old.category, where=self._stack[-1] if self._stack else None)
            if old is not None and new is not None:  # the registered parameter's shape and dtype
                self.allocs[new].shape, self.allocs[new].dtype = old.shape, old.dtype

    def register(self, tensors, category: str) -> None:
        """Storages that exist before tracking starts (weights, adapters, optimizer state, ...)."""
        for t in tensors:
            if torch.is_tensor(t):
                for st in storages_of(t):
                    self._add(st, category, t=t)

    def mark(self, tensors, category: str) -> None:
        """Name what tracked storages are now (e.g. gradients just before zero_grad frees them)."""
        for t in tensors:
            if torch.is_tensor(t):
                for st in storages_of(t):
                    uid = self._seen.get(st._cdata)
                    if uid is not None and self.allocs[uid].category is None:
                        self._roles[uid] = category
        if category == "gradients" and self._root is not None:  # a gradient is named by its parameter's module
            for n, p in self._root.named_parameters():
                if p.grad is not None:
                    self._name_storages(p.grad, _short(n.rpartition(".")[0]))

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps every mode's __torch_dispatch__ in torch._disable_dynamo unless this says no: a cost on
        # every op, for nothing, since the tracked step is never compiled
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # DTensor (FSDP2) dispatches to its local tensors in C++: re-entering the mode there would recurse;
        # its outputs' local storages are tracked below (as torch's MemTracker does)
        wrapper = next((t for t in types if hasattr(t, "__tensor_flatten__") and t.__name__ != "DTensor"), None)
        if wrapper is not None:
            # a wrapper subclass (optimum-quanto's QTensors) runs its own aten ops inside its __torch_dispatch__,
            # where this mode is off: re-enter the mode so they are tracked (quanto dequantizes its weight on
            # every matmul, optimum/quanto/tensor/qtensor.py qfallback)
            with self:
                out = wrapper.__torch_dispatch__(func, types, args, kwargs or {})
        else:
            out = func(*args, **(kwargs or {}))
        fresh = _FRESH.get(func)
        if fresh is None:
            # views and in-place ops return storages that already exist; the schema says so (alias_info)
            fresh = _FRESH[func] = any(r.alias_info is None for r in func._schema.returns)
        if fresh:
            if self._stack:
                where = self._stack[-1]
            else:  # backward outside recomputation: the autograd node running (e.g. MmBackward0)
                node = torch._C._current_autograd_node()
                where = None if node is None else "autograd " + node.name()
            for t in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    shape = t.shape
                    is_logits = len(shape) >= 2 and shape[-1] == self.vocab_size \
                        and self.logits_ndim in (None, len(shape))
                    for st in storages_of(t):
                        self._add(st, None, is_logits, t, where)
        return out

    def classify(self, optimizer_state) -> TrackResult:
        """Name every allocation by what it became (see `mark`), then replay the timeline to find the peak."""
        self.mark(optimizer_state, "optimizer")
        role: dict[int, str] = dict(self._roles)
        for uid, a in self.allocs.items():
            if a.category is not None:
                role.setdefault(uid, a.category)
            elif uid in role:
                continue
            elif uid in self._logit_uids:
                role[uid] = "logits"
            elif a.phase == "forward" and a.freed_phase != "forward":
                role[uid] = "activations"  # saved for backward: made in forward, alive past it
            else:
                role[uid] = "temporaries"
        self.roles = role
        current = dict.fromkeys(CATEGORIES, 0)
        total = peak = 0
        peak_breakdown, peak_phase = dict(current), "setup"
        phase_peaks = dict.fromkeys(PHASES, 0)
        phase_of_event = self._event_phases()
        for (uid, sign), phase in zip(self.events, phase_of_event, strict=True):
            n = self.allocs[uid].nbytes * sign
            current[role[uid]] += n
            total += n
            if phase in phase_peaks and total > phase_peaks[phase]:
                phase_peaks[phase] = total
            if total > peak and phase in PHASES:
                peak, peak_breakdown, peak_phase = total, dict(current), phase
        return TrackResult(peak_bytes=peak, peak_phase=peak_phase, breakdown=peak_breakdown, phase_peaks=phase_peaks,
                           steady_bytes=total)

    def _event_phases(self) -> list[str]:
        out = []
        for uid, sign in self.events:
            a = self.allocs[uid]
            out.append(a.phase if sign > 0 else (a.freed_phase or a.phase))
        return out


def _short(name: str) -> str:
    """A module path without peft's wrapper prefix (base_model.model.model.layers.0 -> model.layers.0)."""
    if name == "base_model.model":
        return ""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name
