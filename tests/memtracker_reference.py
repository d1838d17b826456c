"""Independent reference for the CPU measurement: torch's own MemTracker
(torch/distributed/_tools/mem_tracker.py), which shares no code with peftprof/run/track.py.

Only the model construction (peftprof.run.build.build) and the training step (peftprof.run.step.train_step,
so that both tools measure the same step) are reused: neither touches the tracker. Nothing here imports
peftprof.run.track or peftprof.run.probe.

How MemTracker defines its categories (mem_tracker.py, _MemRefType and __torch_dispatch__):
- PARAM / BUFFER: storages of module parameters / buffers (frozen and trainable alike).
- OTH: storages handed to `track_external` as plain tensors; here the bitsandbytes quant_state tensors
  (absmax, code, nested statistics, int8 SCB), which are attributes, not parameters or buffers.
- GRAD: storages passed to a parameter's grad hook (re-labelled at that moment, they were TEMP before).
- OPT: optimizer state, and every storage created while `optimizer.step()` runs (`_in_opt`).
- ACT: storages created in forward, and in backward inside checkpoint recomputation (`_in_ac`).
- TEMP: every other storage created in backward.

peftprof's categories (peftprof/run/track.py `classify`, README "What the estimator predicts") name what a
storage *became* over the whole step, so they are compared in groups whose union means the same thing in
both tools:
- "static"  PARAM + BUFFER + OTH      <-> weights + quant_constants + trainable  (exist before the step)
- "grads"   GRAD                      <-> gradients                              (p.grad of trainable params)
- "optim"   OPT                       <-> optimizer                              (state; see below)
- "dynamic" ACT + TEMP                <-> activations + logits + temporaries     (made by the step's ops)
Temporaries created inside `optimizer.step()` are OPT for MemTracker and temporaries for peftprof; they are
moved to "dynamic" here (`opt_step_temporaries`), so "optim" is the optimizer state alone in both.
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._pytree import tree_flatten

from peftprof.run.build import build
from peftprof.run.step import optimizer_state, synthetic_batch, train_step

GROUPS = {
    "static": (("PARAM", "BUFFER", "OTH"), ("weights", "quant_constants", "trainable")),
    "grads": (("GRAD",), ("gradients",)),
    "optim": (("OPT",), ("optimizer",)),
    "dynamic": (("ACT", "TEMP"), ("activations", "logits", "temporaries")),
}


class CycleFreeModTracker(ModTracker):
    """ModTracker that removes its multi-grad hooks once backward is over, so they leak nothing.

    Why (a MemTracker artifact; it explains the issue #12 lead): ModTracker._fw_pre_hook
    (torch/distributed/_tools/mod_tracker.py) calls `register_multi_grad_hook(inputs, ...)` (mode "all") on
    every module input that requires grad and drops the handle. In mode "all" (torch/autograd/graph.py) the
    hook closure keeps `grad_fns`, the inputs' autograd nodes, while each node keeps the hook (a non-leaf
    tensor's hook dict is registered on its grad_fn): a cycle through C++ that Python's GC cannot collect, so
    those nodes never die. A node keeps its next edges, down to the AccumulateGrad node of every leaf that
    requires grad, and AccumulateGrad owns its leaf. With checkpointing on, transformers'
    `enable_input_require_grads` (modeling_utils.py `_activation_checkpointing_enable`) makes the embedding
    output such a leaf, so under stock MemTracker the embedding output and its .grad
    (2 x batch x seq x hidden values) outlive the step: they stay in MemTracker's books through the optimizer
    step and into every later step (tests/test_crosscheck.py shows it with gc: without a tracker no such
    tensor survives the step). Here the handles are kept and removed by an engine callback at the end of
    backward (where torch's ModTracker resets `parents`), after every hook has run; the nodes then die with
    the graph, as they do without a tracker. The body is torch's _fw_pre_hook with the handle kept."""

    def __init__(self):
        super().__init__()
        self._handles: list = []

    def _fw_pre_hook(self, mod, input):
        if torch._dynamo.eval_frame._is_in_optimized_module():
            return
        name = self._get_mod_name(mod)
        w_mod = weakref.ref(mod)
        self._get_append_fn(w_mod, name, False)()
        if self._user_pre_fw_hook is not None:
            self._user_pre_fw_hook(mod, input)
        args, _ = tree_flatten(input)
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if not self.is_bw:
            if tensors:
                self._handles.append(register_multi_grad_hook(tensors, self._get_pop_fn(w_mod, name, True)))
            else:
                self._post_bw_callbacks_to_enqueue.append(self._get_pop_fn(w_mod, name, True))

    def _maybe_set_engine_callback(self):
        if not self._has_callback:
            handles, self._handles = self._handles, []
            torch.autograd.Variable._execution_engine.queue_callback(lambda: [h.remove() for h in handles])
        super()._maybe_set_engine_callback()


class FrozenSafeMemTracker(MemTracker):
    """MemTracker that installs grad hooks only on parameters that require grad: torch's version calls
    `param.register_hook` on every parameter, which raises on the frozen base of a PEFT model
    ("cannot register a hook on a tensor that doesn't require gradient"). `cycle_free` swaps in
    CycleFreeModTracker (default; False keeps torch's ModTracker, to show its artifact)."""

    def __init__(self, cycle_free: bool = True):
        super().__init__()
        if cycle_free:
            self._mod_tracker = CycleFreeModTracker()

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        param_mem, buffer_mem = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if not param.requires_grad or self._param_to_grad_hook_handles.get(param) is not None:
                    continue
                self._param_to_grad_hook_handles[param] = (  # the same re-labelling torch's closure does
                    param.register_hook(self._grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: self._grad_hook(p.grad)))
        return param_mem, buffer_mem

    ignored: tuple = ()  # storages never counted (the input batch: the runner does not count it)

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self.ignored and any(st is ig for st in get_untyped_storages(t) for ig in self.ignored):
            return
        super()._track(reftype, t)

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


class _NoProbe:
    """train_step reports phases to a probe; the reference needs none."""

    def set_phase(self, phase):
        pass

    def mark_gradients(self, grads):
        pass


@dataclass
class Reference:
    peak_bytes: int
    by_reftype: dict[str, int]  # MemTracker's snapshot at its peak, by _MemRefType name
    groups: dict[str, int]  # the comparison groups (GROUPS), after moving optimizer-step temporaries
    opt_step_temporaries: int  # OPT bytes at the peak that are not optimizer state


def measure(s, *, prior_steps: int | None = None) -> Reference:
    """Build the variant, train `prior_steps` untracked steps (default: the runner's warm-up + timed steps,
    so optimizer state exists and the step is steady), then measure one more step under MemTracker."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    built = build(s, "cpu")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(s.run.seed))
    built.model.train()
    probe = _NoProbe()
    n = s.run.warmup_steps + s.run.steps if prior_steps is None else prior_steps
    for _ in range(max(1, n)):
        train_step(built, s, ids, probe, {})
    gc.collect()
    mt = FrozenSafeMemTracker()
    # existing storages: parameters/buffers (PARAM/BUFFER), optimizer state (OPT), quant_state tensors (OTH).
    # The input ids exist before the step and the runner does not count them; MemTracker would add them as ACT
    # when a model first views them (gpt2, opt: input_ids.view(...)), so they are ignored.
    mt.ignored = (ids.untyped_storage(),)
    mt.track_external(built.model, built.optimizer, *built.quant_tensors)
    with mt:
        train_step(built, s, ids, probe, {})
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_reftype = {k.name: v for k, v in snap.items() if isinstance(k, _MemRefType)}
    peak = snap["Total"]
    state = sum(st.nbytes() for st in {t.untyped_storage() for t in optimizer_state(built.optimizer)})
    opt_temps = max(0, by_reftype["OPT"] - state) if by_reftype["OPT"] else 0
    groups = {g: sum(by_reftype[k] for k in keys) for g, (keys, _) in GROUPS.items()}
    groups["optim"] -= opt_temps
    groups["dynamic"] += opt_temps
    del built, mt
    gc.collect()
    return Reference(peak_bytes=peak, by_reftype=by_reftype, groups=groups, opt_step_temporaries=opt_temps)


def peftprof_groups(breakdown: dict[str, int]) -> dict[str, int]:
    return {g: sum(breakdown.get(c, 0) for c in cats) for g, (_, cats) in GROUPS.items()}
