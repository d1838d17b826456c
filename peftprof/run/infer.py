"""[inference]: serve a variant instead of training it. Forward-only memory and latency of one forward pass
over the prompt (max_new_tokens = 0) or of greedy generation with transformers' KV cache (`model.generate`),
with the adapters resident (unmerged, K of them on one base) or folded into the base (peft merge_and_unload),
optionally offloaded with accelerate (device_map from max_memory: layers beyond the cap on disk; the trace
attaches accelerate's own hooks to the fake model with a fake offload folder: `_hook_fake_offload`).

The runner (`run_inference`) and the trace estimator (peftprof/trace.py, `serve_step` on fake tensors) run the
same `serve_step`; the tracker (run/track.py) classifies what it allocates: `weights` the base, `trainable` the
resident adapters, `activations` the KV cache (marked as the cache layers make it), `logits` the vocabulary-wide
tensors, `temporaries` everything else a forward makes and frees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..estimate.offload import placement_of
from ..settings import Scenario
from .probe import make_probe, now

BNB_KINDS = ("int8", "fp4", "nf4")


@dataclass
class Served:
    """The model being served and what the tracker registers before the measured pass."""

    model: torch.nn.Module
    quant_tensors: list[torch.Tensor] = field(default_factory=list)
    n_adapters: int = 0  # adapters resident on the base (0 when merged or for full fine-tuning)
    device_map: dict | None = None  # accelerate's placement when offloading
    offload_dir: object = None  # tempfile.TemporaryDirectory of the disk offload


def add_resident_adapters(model, s: Scenario) -> int:
    """Up to `[peft] num_adapters` adapters on one base (peft PeftModel.add_adapter), the first one active;
    returns how many are resident. Adapters the build already made are kept."""
    from .build import _peft_config

    have = len(getattr(model, "peft_config", {}) or {})
    for i in range(have, s.peft.num_adapters):
        model.add_adapter(f"resident_{i}", _peft_config(s))
    return max(have, s.peft.num_adapters)


def bnb_quant_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes' quantization constants as they are now (peft's 4-bit merge requantizes: new QuantStates)."""
    import bitsandbytes as bnb

    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        elif isinstance(m, bnb.nn.Linear8bitLt) and getattr(m.weight, "SCB", None) is not None:
            out.append(m.weight.SCB)
    return out


def build_served(s: Scenario, device: str) -> Served:
    """The serving stack: the base from config (random weights), quantized as the runner quantizes it but not
    prepared for k-bit training (peft's prepare_model_for_kbit_training upcasts to fp32 for training only:
    a served model keeps its non-quantized parameters in the compute dtype), the adapters, eval mode, then
    merge_and_unload when merged."""
    import peft

    from .build import _peft_config, base_model, quantize_bnb, quantize_int4, quanto_constants

    torch.manual_seed(s.run.seed)
    p = s.precision
    model = base_model(s, "cpu" if p.weights in BNB_KINDS else device)
    quant: list[torch.Tensor] = []
    if p.weights in BNB_KINDS:
        quant, _ = quantize_bnb(model, s, device)
        model.to(device)
    elif p.weights == "int4":
        quantize_int4(model, s)
        quant = quanto_constants(model)
    for param in model.parameters():
        param.requires_grad_(False)
    n = 0
    if s.peft.method != "full":
        model = peft.get_peft_model(model, _peft_config(s))
        n = add_resident_adapters(model, s) if s.peft.num_adapters > 1 else 1
        gen = torch.Generator().manual_seed(s.run.seed + 1)
        for name, param in model.named_parameters():  # a served adapter is a trained one: LoRA's B is not zero
            if ".lora_B." in name:
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.02)
    model.eval()
    if s.inference.merged:
        model = model.merge_and_unload()
        n = 0
        gc.collect()
        if p.weights in BNB_KINDS:
            quant = bnb_quant_tensors(model)
    served = Served(model=model, quant_tensors=quant, n_adapters=n)
    if s.inference.max_memory:
        offload(served, s, device)
    return served


def offload(served: Served, s: Scenario, device: str) -> None:
    """accelerate's big-model placement: infer_auto_device_map with max_memory for the device (modules that do
    not fit go to disk), then dispatch_model with an offload folder (weights written as .dat memmaps, loaded into
    the device before each offloaded module runs: accelerate/hooks.py AlignDevicesHook)."""
    from accelerate import dispatch_model

    from ..rules_inference import max_memory_bytes

    model = served.model
    cap = max_memory_bytes(s.inference.max_memory)  # the loader's parser (it strips surrounding whitespace)
    key = 0 if device == "cuda" else "cpu"
    device_map = offload_device_map(model, cap, key)
    served.offload_dir = tempfile.TemporaryDirectory(prefix="peftprof-offload-")
    served.model = dispatch_model(model, device_map=device_map, offload_dir=served.offload_dir.name,
                                  main_device=device)
    served.device_map = {k: str(v) for k, v in device_map.items()}


def offload_device_map(model, cap: int, key) -> dict:
    """accelerate's placement of `model` under `cap` bytes on the device `key` ("cpu", or 0 for CUDA), the rest on
    disk: infer_auto_device_map with the model's no_split modules (the decoder layer class). When nothing fits
    (a cap below the reserve it keeps for the largest layer) the cleaned map is {"": "disk"} (or the one
    top-level child), which accelerate 1.15's dispatch_model cannot write (extract_submodules_state_dict matches
    no key of "", index.json is never written): the uncleaned map (clean_result=False) names the same placement
    module by module. Works on a meta-built model (the trace calls it too)."""
    from accelerate import infer_auto_device_map

    no_split = getattr(model, "_no_split_modules", None) or getattr(
        getattr(model, "get_base_model", lambda: model)(), "_no_split_modules", None)
    memory = {key: cap, "disk": 1 << 60}
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if set(device_map.values()) == {"disk"}:
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                           clean_result=False)
    return dict(device_map)


@contextlib.contextmanager
def marking_offload_loads(tracker):
    """While tracking: each offloaded weight accelerate's AlignDevicesHook loads before its module runs
    (hooks.py pre_forward: weights_map[name], utils/offload.py load_offloaded_weight: torch.tensor(np.memmap))
    counted as the one copy it is, named `weights` (an adapter's `trainable`). torch.tensor(memmap) builds
    its storage from a view of the memory-mapped file that a dispatch mode sees as a fresh storage too
    (aten::lift_fresh): that view is the offload file's pages, not an allocation, and it dies whenever Python
    drops its numpy object, so it is made outside the tracker and the copy is re-made inside it. After the
    module runs, post_forward puts each weight back on `meta` (set_module_tensor_to_device(..., "meta")): a
    meta tensor holds no memory, but its storage reports the nbytes of its shape, so those moves are made
    outside the tracker too."""
    if tracker is None:
        yield
        return
    from accelerate import hooks as acc_hooks
    from accelerate.utils import offload as acc_offload
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import _disable_current_modes

    original, original_set = acc_offload.load_offloaded_weight, acc_hooks.set_module_tensor_to_device

    def set_tensor(module, name, device, *args, **kwargs):
        if str(device) != "meta":
            return original_set(module, name, device, *args, **kwargs)
        owner, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner) if owner else module
        t = owner._parameters.get(leaf)
        if isinstance(t, FakeTensor):  # traced: Parameter(fake) is a fake tensor, which accelerate cannot re-wrap
            with _disable_current_modes():  # a plain meta parameter, as accelerate leaves it
                owner._parameters[leaf] = torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                                             requires_grad=False)
            return None
        with _disable_current_modes():
            return original_set(module, name, device, *args, **kwargs)

    def load(weight_file, weight_info):
        with _disable_current_modes():
            staged = original(weight_file, weight_info)
        copy = staged.clone()
        del staged
        _count_load(tracker, copy, str(weight_file))
        return copy

    acc_offload.load_offloaded_weight, acc_hooks.set_module_tensor_to_device = load, set_tensor
    try:
        yield
    finally:
        acc_offload.load_offloaded_weight, acc_hooks.set_module_tensor_to_device = original, original_set


def _count_load(tracker, t: torch.Tensor, name: str) -> None:
    """Name a loaded offloaded weight (`weights`, or `trainable` for an adapter's) and add its bytes to what the
    request read from disk (tracker.offload_read_bytes)."""
    tracker.mark([t], "trainable" if _is_adapter(os.path.basename(name)) else "weights")
    tracker.offload_read_bytes = getattr(tracker, "offload_read_bytes", 0) + t.numel() * t.element_size()


def registered(served: Served) -> dict[str, list]:
    """Storages that exist before the measured pass: base weights and buffers, adapters (`trainable`), constants."""
    model = served.model
    adapters = [p for n, p in model.named_parameters() if _is_adapter(n)]
    ids = {id(p) for p in adapters}
    weights = [p for p in model.parameters() if id(p) not in ids] + list(model.buffers())
    weights = [t for t in weights if t.device.type != "meta"]  # offloaded to disk: accelerate loads them per call
    adapters = [t for t in adapters if t.device.type != "meta"]
    weights += [t for t in getattr(model, "prompt_tokens", {}).values() if torch.is_tensor(t)]
    return {"quant_constants": served.quant_tensors, "weights": weights, "trainable": adapters}


def _is_adapter(name: str) -> bool:
    """peft's adapter parameters: lora_*, ia3_l, hada_*, lokr_*, vera_lambda_*, oft_*, prompt/prefix embeddings."""
    leaf = name.split(".")
    return any(part.startswith(("lora_", "ia3_", "hada_", "lokr_", "vera_", "oft_", "prompt_encoder"))
               for part in leaf)


def prompt(s: Scenario, device: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """batch_size x seq_len random prompt ids (as the training batch: run/step.py synthetic_batch)."""
    return torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len),
                         generator=generator).to(device)


@contextlib.contextmanager
def marking_kv_cache(tracker):
    """Name every key/value tensor the cache layers store as the KV cache (category `activations` of the
    breakdown) when it is made: transformers cache_utils.py DynamicLayer.update / DynamicSlidingWindowLayer.update
    concatenate the new tokens onto the old ones (torch.cat: a new storage each step)."""
    from transformers import cache_utils

    if tracker is None:
        yield
        return
    classes = [c for c in (cache_utils.DynamicLayer, getattr(cache_utils, "DynamicSlidingWindowLayer", None))
               if c is not None]
    originals = {c: c.__dict__.get("update") for c in classes}

    def wrap(orig):
        def update(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            tracker.mark([self.keys, self.values], "activations")
            return out
        return update

    for c, orig in originals.items():
        if orig is not None:
            c.update = wrap(orig)
    try:
        yield
    finally:
        for c, orig in originals.items():
            if orig is not None:
                c.update = orig


def serve_step(model, s: Scenario, ids: torch.Tensor, probe=None) -> None:
    """One serving request: a forward over the prompt without a cache (max_new_tokens 0, e.g. scoring), or
    greedy generation of exactly max_new_tokens tokens with a DynamicCache (no eos stop). The output is
    dropped; the probe's phase is `forward` throughout (nothing is saved for backward: torch.no_grad)."""
    if probe is not None:
        probe.set_phase("forward")
    n = s.inference.max_new_tokens
    tracker = getattr(probe, "tracker", None) if probe is not None and getattr(probe, "active", False) else None
    with torch.no_grad(), marking_kv_cache(tracker), marking_offload_loads(tracker):
        if n == 0:
            out = model(input_ids=ids, use_cache=False)
        else:
            out = model.generate(input_ids=ids, max_new_tokens=n,
                                 do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=None,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
        del out
    if probe is not None:
        probe.set_phase("steady")


def kv_cache_bytes_measured(model, s: Scenario, ids: torch.Tensor) -> int:
    """Bytes of the DynamicCache's key/value storages after the prefill plus max_new_tokens - 1 decode steps
    (the cache `generate` holds when its last token is chosen), measured on a cache we keep."""
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=s.inference.max_new_tokens,
                       do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=None, num_beams=1,
                       cache=cache, temperature=None, top_p=None, top_k=None)
    from .build import tensor_bytes

    return tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])


def run_inference(s: Scenario, record: dict, *, device: str, steps: int | None = None, max_memory: int | None = None,
                  fault=None, progress=None) -> dict:
    """The runner's branch for `[inference] enabled`: build the served model, time `steps` requests, track one,
    fill `record` (status, measured, checks) and return it. Failures are results, as in run/runner.py."""
    from ..timeline import explain
    from .runner import error_info
    from .step import inject_fault
    from .track import SimulatedOOM

    steps = steps or s.run.steps
    probe = make_probe(device, cap_bytes=max_memory, vocab_size=s.model.arch.vocab_size)
    where = {"phase": "build"}
    say = progress or (lambda msg: None)
    served = None
    try:
        say("build (inference)")
        inject_fault(fault, "build")
        gen = torch.Generator().manual_seed(s.run.seed)
        ids = prompt(s, device, gen)
        reference = None
        if s.inference.merged and s.peft.method != "full":
            reference = _unmerged_reference(s, device, ids)
        served = build_served(s, device)
        model = served.model
        where["phase"] = "forward"
        for _ in range(s.run.warmup_steps):
            serve_step(model, s, ids)
        times = []
        for i in range(steps):
            say(f"request {i + 1}/{steps}")
            probe.synchronize()
            t0 = now()
            serve_step(model, s, ids)
            probe.synchronize()
            times.append(now() - t0)
        prefill = []
        if s.inference.max_new_tokens > 1:  # the prompt's forward alone: a request for one token
            one = dataclasses.replace(s, inference=dataclasses.replace(s.inference, max_new_tokens=1))
            for _ in range(max(1, steps)):
                t0 = now()
                serve_step(model, one, ids)
                prefill.append(now() - t0)
        say("tracked request")
        with probe.tracking(registered(served)):
            inject_fault(fault, "forward")
            serve_step(model, s, ids, probe)
        tracked = probe.result([])
        request_s = statistics.median(times)
        n_new = s.inference.max_new_tokens
        b = s.training.batch_size
        measured = {"device": device, "mode": "inference", "peak_bytes": tracked.peak_bytes,
                    "peak_phase": tracked.peak_phase, "breakdown": tracked.breakdown,
                    "phases": [{"phase": "forward", "bytes": tracked.phase_peaks.get("forward", 0)},
                               {"phase": "steady", "bytes": tracked.steady_bytes}],
                    "step_time_s": request_s, "step_times_s": times,
                    "latency_ms": request_s * 1000, "n_adapters": served.n_adapters, "merged": s.inference.merged}
        if n_new:
            measured["tokens_per_s"] = b * n_new / request_s
            measured["ms_per_token"] = request_s * 1000 / n_new
            if prefill:
                pre = statistics.median(prefill)
                measured["prefill_ms"] = pre * 1000
                measured["decode_ms_per_token"] = max(0.0, request_s - pre) * 1000 / (n_new - 1)
            measured["kv_cache_bytes"] = kv_cache_bytes_measured(model, s, ids)
        else:
            measured["tokens_per_s"] = b * s.training.seq_len / request_s
        if served.device_map is not None:
            measured.update(offload_bytes(served, device))
            if getattr(probe, "tracker", None) is not None:  # counted by marking_offload_loads (CPU tracking)
                measured["disk_read_bytes_per_request"] = getattr(probe.tracker, "offload_read_bytes", 0)
        if getattr(probe, "tracker", None) is not None:
            measured.update(explain(probe.tracker))
        record["measured"] = measured
        where["phase"] = "checks"
        if reference is not None:
            with torch.no_grad():
                merged_out = model(input_ids=ids[:1], use_cache=False).logits[:, -1].float()
            record["checks"]["merge_max_abs_diff"] = float((merged_out - reference).abs().max())
    except (torch.OutOfMemoryError, MemoryError, SimulatedOOM) as e:
        record.update(status="oom", error={"phase": where["phase"], "message": str(e)[:500]})
    except Exception as e:  # a library refusing (e.g. peft cannot merge into this layer) is a result
        record.update(status="error", error=error_info(e, where["phase"]))
    finally:
        extra = probe.finish()
        if record["measured"] is not None:
            record["measured"].update(extra)
        if served is not None and served.offload_dir is not None:
            served.offload_dir.cleanup()
        del served
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return record


def _unmerged_reference(s: Scenario, device: str, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the unmerged model (same seed, same adapters) for the merged-equals-unmerged
    check; LoRA's B starts at zero, so the adapters are given random values first (else the check is trivial)."""
    unmerged = dataclasses.replace(s, inference=dataclasses.replace(s.inference, merged=False, max_memory=""))
    served = build_served(unmerged, device)
    with torch.no_grad():
        out = served.model(input_ids=ids[:1], use_cache=False).logits[:, -1].float()
    del served
    gc.collect()
    return out


def offload_bytes(served: Served, device: str = "cpu") -> dict:
    """Bytes of parameters and buffers per placement of accelerate's device map (device, disk): an offloaded
    parameter is on `meta` between its module's calls; buffers stay on the device (offload_buffers=False)."""
    placed: dict[str, int] = {}
    model = served.model
    for t in [*model.parameters(), *model.buffers()]:
        where = "disk" if t.device.type == "meta" else device
        placed[where] = placed.get(where, 0) + t.numel() * t.element_size()
    return {"device_map": served.device_map, "placement_bytes": placed}


@contextlib.contextmanager
def _stop_by_length(length: int):
    """Under fake tensors `generate`'s stop check (generation/utils.py StopCheck: bool(unfinished.max() == 0))
    has no value to read; without an eos token only the length stops it, so decide on the length, as the real
    run does."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers.generation import utils as gen_utils

    original, original_bool = gen_utils.StopCheck.__call__, torch.Tensor.__bool__

    def call(self, unfinished_sequences, tokens, current_length):
        return current_length >= length

    def as_bool(self):
        # generate() asks `(attention_mask == 1).all()` of its all-ones mask (generation/utils.py generate): true
        return True if isinstance(self, FakeTensor) else original_bool(self)

    gen_utils.StopCheck.__call__, torch.Tensor.__bool__ = call, as_bool
    try:
        yield
    finally:
        gen_utils.StopCheck.__call__, torch.Tensor.__bool__ = original, original_bool


def trace_serving(s: Scenario, snapshot_path=None) -> dict:
    """The serving request traced on fake tensors (peftprof/trace.py's route: build on meta, stand-in
    bitsandbytes layers, parameters replaced by fake CPU tensors), run through `serve_step` with the runner's
    CPU probe. A merged model is the bare base: merge_and_unload leaves the base's tensors, same shapes (peft
    requantizes 4-bit merges to the same sizes). Returns trace_peak's fields."""
    import logging
    import warnings

    import peft
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..timeline import explain
    from ..trace import UserError, _fake_in_place, _mask_decisions_as_in_real_runs, _quantize_on_meta, check_traceable
    from .build import _peft_config, base_model, model_bytes
    from .probe import CpuProbe

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    check_traceable(s)  # one forward per generated token
    if s.precision.weights == "int4":
        raise UserError(f"{s.name}: --method trace does not support int4 (optimum-quanto cannot quantize meta tensors)")
    model = base_model(s, "meta")
    if s.precision.weights in BNB_KINDS:
        _quantize_on_meta(model, s)
    for param in model.parameters():
        param.requires_grad_(False)
    n_adapters = 0
    if s.peft.method != "full" and not s.inference.merged:
        with torch.device("meta"):
            model = peft.get_peft_model(model, _peft_config(s))
            n_adapters = add_resident_adapters(model, s) if s.peft.num_adapters > 1 else 1
    model.eval()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    offloaded = None
    if s.inference.max_memory:
        from ..rules_inference import max_memory_bytes

        device_map = offload_device_map(model, max_memory_bytes(s.inference.max_memory), "cpu")
        offload_facts = traced_offload_fields(s, model, device_map)
    _fake_in_place(model, fake_mode)
    if s.inference.max_memory:
        offloaded = _hook_fake_offload(model, device_map, fake_mode)
    quant = [b for m in model.modules() if type(m).__name__.startswith("Traced")
             for n, b in m.named_buffers(recurse=False) if n not in ("packed", "cb")]
    served = Served(model=model, quant_tensors=quant, n_adapters=n_adapters)
    length = s.training.seq_len + s.inference.max_new_tokens
    with fake_mode, _mask_decisions_as_in_real_runs(s), _stop_by_length(length):
        ids = torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len))
        probe = CpuProbe(vocab_size=s.model.arch.vocab_size, sample_rss=False)
        reg = registered(served)
        reg["weights"] = [t for t in reg["weights"] if not any(t is q for q in quant)]
        try:
            with probe.tracking(reg) as tracker:
                if offloaded is not None:
                    offloaded.tracker = tracker
                serve_step(model, s, ids, probe)
        except (RuntimeError, ValueError, TypeError) as e:  # a library refusing the request: say so, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"{s.name}: the traced request fails: {first}") from None
        result = probe.result([])
    if snapshot_path is not None:
        from ..snapshot import write_snapshot

        write_snapshot(probe.tracker, snapshot_path)
    return {"peak_bytes": result.peak_bytes, "peak_phase": result.peak_phase, "breakdown": result.breakdown,
            "phase_peaks": result.phase_peaks, "wrapped_bytes": model_bytes(model, quant),
            "n_trainable_params": 0, **explain(probe.tracker),
            "serving": {**serving_fields(s), **(offload_facts if s.inference.max_memory else {})}}


class FakeOffloadedWeights(Mapping):
    """The offload folder of a traced request: accelerate's weights_map (utils/offload.py
    OffloadedWeightsLoader) with the disk-placed parameters' names, where reading one makes what
    load_offloaded_weight makes, one new tensor of its shape and dtype (fake), counted as marking_offload_loads
    counts a real load."""

    def __init__(self, shapes: dict[str, tuple], fake_mode):
        self.shapes, self.fake_mode, self.tracker = shapes, fake_mode, None

    def __getitem__(self, key: str):
        shape, dtype = self.shapes[key]
        with self.fake_mode:
            t = torch.empty(shape, dtype=dtype)
        if self.tracker is not None:
            _count_load(self.tracker, t, key)
        return t

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def _hook_fake_offload(model, device_map: dict, fake_mode) -> FakeOffloadedWeights:
    """What accelerate's dispatch_model does on a CPU main device (big_modeling.py), on the fake model: the
    disk-placed parameters back on `meta` (buffers stay: offload_buffers=False), then
    attach_align_device_hook_on_blocks with the same execution devices, offload flags and weights map (here
    the fake folder). Returns the weights map (its tracker is set once tracking starts)."""
    from accelerate.hooks import attach_align_device_hook_on_blocks

    disk = [k for k, v in device_map.items() if v == "disk"]
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight is written under both names
        if any(k == "" or name == k or name.startswith(k + ".") for k in disk):
            shapes[name] = (tuple(p.shape), p.dtype)
            mod_name, _, leaf = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod._parameters[leaf] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False)
    weights = FakeOffloadedWeights(shapes, fake_mode)
    execution = {name: "cpu" for name in device_map}
    execution[""] = "cpu"
    attach_align_device_hook_on_blocks(model, execution_device=execution,
                                       offload={name: dev == "disk" for name, dev in device_map.items()},
                                       offload_buffers=False, weights_map=weights, tied_params_map={})
    return weights


def traced_offload_fields(s: Scenario, model, device_map: dict) -> dict:
    """offload_fields from accelerate's own map on the meta-built model: parameters and buffers left on the
    device (buffers always stay), parameters on disk, and the parameters one forward reads (those of the modules
    that run: an inactive adapter's never do)."""
    from ..estimate.inference import offload_fields

    def where(name):
        return placement_of(name, device_map)

    resident = sum(b.numel() * b.element_size() for b in model.buffers())
    disk = read = 0
    for name, t in model.named_parameters():
        size = t.numel() * t.element_size()
        if where(name) != "disk":
            resident += size
            continue
        disk += size
        read += size if _runs(name) else 0
    if s.model.arch.tied_embeddings:  # offload_state_dict writes the state dict, which names a tied weight twice:
        for name, t in model.named_parameters(remove_duplicate=False):  # lm_head's is a file of its own, read by it
            if name.endswith("lm_head.weight") and where(name) == "disk" and where(
                    name.replace("lm_head", "model.embed_tokens")) == "disk":
                read += t.numel() * t.element_size()
                disk += t.numel() * t.element_size()
    return offload_fields(s, {k: str(v) for k, v in device_map.items()}, device_bytes=resident, disk_bytes=disk,
                          read_bytes_per_forward=read)


def _runs(name: str) -> bool:
    """Whether a served forward reads this parameter: not an inactive adapter's (peft's first and active adapter
    is "default"), nor the base copy or an inactive copy under a ModulesToSaveWrapper (peft/utils/other.py
    ModulesToSaveWrapper.forward runs modules_to_save[active_adapter] only, never original_module)."""
    if ".original_module." in name:
        return False
    if ".modules_to_save." in name:
        return ".modules_to_save.default." in name
    return not _is_adapter(name) or ".default." in name


def serving_fields(s: Scenario) -> dict:
    """What a serving estimate says besides memory (trace.py trace_estimate adds these to a traced one)."""
    from ..estimate.inference import forward_flops, inference_fields

    return {"mode": "inference", "n_trainable_params": 0, "flops_per_step": forward_flops(s),
            "tokens_per_step": s.training.batch_size * (s.inference.max_new_tokens or s.training.seq_len),
            **inference_fields(s)}
