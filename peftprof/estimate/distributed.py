"""Per-rank memory of data-parallel training ([distributed] world_size > 1): DDP, FSDP2 and DeepSpeed ZeRO 1/2/3.

Pure functions of a resolved Scenario; bytes unless the name says otherwise. Every rank runs the scenario's
micro-batch (`training.batch_size` is per rank), so activations and logits are the single-device ones
(activations.py); what changes is where parameters, gradients and optimizer state live. The estimate is for
rank 0, the rank holding the largest shard of every tensor (torch.chunk gives the first ranks ceil(dim0 / N)
rows, the last ones fewer or none).

Sources, torch 2.13:
- FSDP2, torch/distributed/fsdp/_fully_shard/: _fsdp_param.py FSDPParam._init_sharded_param (each parameter's
  dim 0 padded to a multiple of N, rank r keeps rows [r*ceil(d0/N), ...) in a padded storage), init_all_gather_
  outputs (the unsharded parameter: N x the padded shard), _fsdp_collectives.py foreach_all_gather (one flat
  buffer of N x the padded shards of a group, uint8 when the group mixes dtypes: same bytes) and foreach_reduce
  (one flat reduce-scatter input of dim-0-padded gradients, one flat reduce output per group that the sharded
  gradients view), _fsdp_param_group.py (wait_for_unshard frees the flat buffer after the copy-out in backward;
  _backward_prefetch unshards the previous layer; post_backward keeps reduce_scatter_max_input_buffers = 1
  reduce-scatter input alive until the next group's post_backward), _fsdp_state.py (the root keeps its
  parameters unsharded from forward to the end of backward: post_forward_mesh_info = None).
- DDP, torch/nn/parallel/distributed.py and torch/csrc/distributed/c10d/reducer.cpp: gradient buckets
  (bucket_cap_mb = 25, the first bucket 1 MiB, _DEFAULT_FIRST_BUCKET_BYTES) allocated once beside the .grad
  tensors (gradient_as_bucket_view=False): one more copy of every trainable parameter's gradient.
- ZeRO: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
  sec. 5: 2 + 2 + K bytes per parameter with mixed-precision Adam (K = 12: fp32 master weights, momentum,
  variance); stage 1 partitions the optimizer state, 2 also the gradients, 3 also the parameters. DeepSpeed
  config defaults (deepspeed/runtime/zero/config.py): reduce_bucket_size 5e8 elements, stage3_prefetch_bucket_
  size 5e7, stage3_param_persistence_threshold 1e5 (smaller parameters stay whole on every rank). ZeRO-Offload
  (Ren et al. 2021): optimizer state, fp32 master weights and the fp32 gradient partition on the host.
  Unmeasured here: DeepSpeed does not run on our machines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..settings import BYTES_PER_ELEMENT, Scenario, matches_target
from . import activations as act_mod
from . import memory as mem
from .cuda import adamw_state_bytes, adamw_temporary_bytes, block_bytes
from .widths import ADAPTER_BYTES_PER_ELEMENT, FP32, non_quantized_bytes_per_element, trainable_bytes_per_element

DDP_BUCKET_CAP_BYTES = 25 * 1024 * 1024  # torch/nn/parallel/distributed.py bucket_cap_mb default
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch/distributed/constants.py _DEFAULT_FIRST_BUCKET_BYTES
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000  # deepspeed/runtime/zero/config.py reduce_bucket_size
ZERO3_PREFETCH_BUCKET_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold (elements)


@dataclass(frozen=True)
class Tensor:
    """One parameter as FSDP sees it: rows along dim 0, elements per row, bytes per element."""

    dim0: int
    row: int
    nbytes_per_element: int
    trainable: bool
    late: bool = False  # a root tensor whose gradient comes after every layer's (input embeddings, prompts)

    @property
    def numel(self) -> int:
        return self.dim0 * self.row

    @property
    def nbytes(self) -> int:
        return self.numel * self.nbytes_per_element

    def shard_rows(self, world: int) -> int:
        return math.ceil(self.dim0 / world)

    def shard_bytes(self, world: int) -> int:
        """Rank 0's padded shard (_init_sharded_param: chunks[0] rows, the padded size of every rank)."""
        return self.shard_rows(world) * self.row * self.nbytes_per_element

    def unsharded_bytes(self, world: int) -> int:
        """The all-gathered parameter: N padded shards (init_all_gather_outputs)."""
        return world * self.shard_bytes(world)


# ---- which tensors each FSDP unit holds (fully_shard on every decoder layer, then on the root) ----

def _linear_tensors(s: Scenario, spec, trainable: bool) -> list[Tensor]:
    """A base linear's weight and bias. nn.Linear weights are (out, in); gpt2's Conv1D (in, out). bitsandbytes
    4-bit weights are Params4bit of shape (ceil(n/2), 1) in its default quant_storage uint8 (functional.py
    quantize_4bit), which FSDP2 shards like any tensor (the Hugging Face FSDP + QLoRA guide sets quant_storage to
    the compute dtype for FSDP1's flat parameters: the same bytes, dim 0 shorter by that dtype's size)."""
    a, p = s.model.arch, s.precision
    if p.is_4bit:
        weight = Tensor(math.ceil(spec.n_weight_params / 2), 1, 1, False)
    else:
        e = trainable_bytes_per_element(s) if trainable else _float_bytes(s)
        dim0, row = (spec.in_features, spec.out_features) if a.model_type == "gpt2" else \
            (spec.out_features, spec.in_features)
        weight = Tensor(dim0, row, e, trainable)
    out = [weight]
    if spec.bias:
        out.append(Tensor(spec.out_features, 1, _bias_bytes(s, trainable), trainable))
    return out


def _float_bytes(s: Scenario) -> int:
    return non_quantized_bytes_per_element(s) if s.precision.is_quantized else BYTES_PER_ELEMENT[s.precision.weights]


def _bias_bytes(s: Scenario, trainable: bool) -> int:
    return trainable_bytes_per_element(s) if trainable else _float_bytes(s)


def _norm_tensors(s: Scenario, trainable: bool) -> list[Tensor]:
    a = s.model.arch
    e = trainable_bytes_per_element(s) if trainable else _float_bytes(s)
    return [Tensor(a.hidden_size, 1, e, trainable)] * (2 if a.norm == "layer" else 1)


def _adapter_tensors(s: Scenario, spec) -> list[Tensor]:
    """peft's trainable tensors on one targeted linear, fp32 (ADAPTER_BYTES_PER_ELEMENT): LoRA A (r, in) and B
    (out, r) (peft/tuners/lora/layer.py update_layer); IA3 (1, in) on feed-forward modules, else (out, 1)
    (peft/tuners/ia3/layer.py update_layer)."""
    m, a = s.peft, s.model.arch
    e = ADAPTER_BYTES_PER_ELEMENT
    if m.method == "lora":
        return [Tensor(m.r, spec.in_features, e, True), Tensor(spec.out_features, m.r, e, True)]
    if any(matches_target(spec.path, t) for t in m.feedforward_targets(a)):
        return [Tensor(1, spec.in_features, e, True)]
    return [Tensor(spec.out_features, 1, e, True)]


def layer_unit(s: Scenario) -> tuple[Tensor, ...]:
    """Every parameter of one decoder layer (one fully_shard unit)."""
    a, m = s.model.arch, s.peft
    full = m.method == "full"
    targeted = set(m.targeted_linears(a))
    out: list[Tensor] = []
    for spec in a.layer_linears:
        out += _linear_tensors(s, spec, full)
        if spec in targeted:
            out += _adapter_tensors(s, spec)
    out += _norm_tensors(s, full) * a.n_norms_per_layer
    e = trainable_bytes_per_element(s) if full else _float_bytes(s)
    out += [Tensor(p.shape[0], p.numel // p.shape[0], e, full) for p in a.layer_params]
    return tuple(out)


def root_unit(s: Scenario) -> tuple[Tensor, ...]:
    """What fully_shard(model) keeps for the root: embeddings, learned positions, linears outside the layers,
    the final norm, lm_head (one tensor when tied), and peft's prompt/prefix encoder (a PeftModel attribute)."""
    a, m = s.model.arch, s.peft
    full = m.method == "full"
    e = trainable_bytes_per_element(s) if full else _float_bytes(s)
    out = [Tensor(a.vocab_size, a.embed_dim, e, full, late=not a.tied_embeddings)]
    if a.n_position_embeddings:
        out.append(Tensor(a.n_position_embeddings, a.hidden_size, e, full, late=True))
    targeted = set(m.targeted_linears(a))
    for spec in a.model_linears:
        out += _linear_tensors(s, spec, full)
        if spec in targeted:
            out += _adapter_tensors(s, spec)
    if a.final_norm:
        out += _norm_tensors(s, full)
    if not a.tied_embeddings:
        out.append(Tensor(a.vocab_size, a.embed_dim, e, full))
    if m.method == "prompt_tuning":
        out.append(Tensor(m.num_virtual_tokens, a.hidden_size, ADAPTER_BYTES_PER_ELEMENT, True, late=True))
    elif m.method == "prefix_tuning":
        out.append(Tensor(m.num_virtual_tokens, a.n_layers * 2 * a.n_kv_heads * a.head_dim,
                          ADAPTER_BYTES_PER_ELEMENT, True, late=True))
    return tuple(out)


# ---- FSDP2 ----

def _blk(device: str):
    """Bytes an allocation takes: CUDA's caching allocator rounds each to 512 B (estimate/cuda.py block_bytes)."""
    return block_bytes if device == "cuda" else (lambda n: n)


def fsdp_terms(s: Scenario, device: str) -> dict[str, int]:
    """The per-rank pieces of FSDP2 (rank 0), each one allocation pattern of torch's code (module docstring)."""
    W = s.distributed.world_size
    blk = _blk(device)
    n = s.model.arch.n_layers
    layer, root = layer_unit(s), root_unit(s)

    def sharded(ts, trainable):  # _sharded_param_data: one padded storage per parameter
        return sum(blk(t.shard_bytes(W)) for t in ts if t.trainable == trainable)

    def unsharded(ts, trainable):  # all_gather_outputs: one storage per parameter
        return sum(blk(t.unsharded_bytes(W)) for t in ts if t.trainable == trainable)

    def grads_sharded(ts):  # foreach_reduce: the group's reduce output, viewed by every sharded .grad
        return blk(sum(t.shard_bytes(W) for t in ts if t.trainable))

    def rs_input(ts):  # foreach_reduce: dim-0-padded unsharded gradients in one flat input
        return blk(sum(t.unsharded_bytes(W) for t in ts if t.trainable))

    def grads_unsharded(ts, early_only=False):  # what autograd makes for the unsharded parameters
        return sum(blk(t.nbytes) for t in ts if t.trainable and not (early_only and t.late))

    return {
        "sharded_frozen": n * sharded(layer, False) + sharded(root, False),
        "sharded_trainable": n * sharded(layer, True) + sharded(root, True),
        "root_unsharded_frozen": unsharded(root, False),
        "root_unsharded_trainable": unsharded(root, True),
        "layer_unsharded_frozen": unsharded(layer, False),
        "layer_unsharded_trainable": unsharded(layer, True),
        # foreach_all_gather: N x the padded shards of the group, one buffer
        "layer_all_gather": blk(sum(t.unsharded_bytes(W) for t in layer)),
        "root_all_gather": blk(sum(t.unsharded_bytes(W) for t in root)),
        "layer_grads_sharded": grads_sharded(layer),
        "root_grads_sharded": grads_sharded(root),
        "layer_reduce_scatter": rs_input(layer),
        "root_reduce_scatter": rs_input(root),
        "layer_grads_unsharded": grads_unsharded(layer),
        "root_grads_unsharded": grads_unsharded(root),
        "root_early_grads_unsharded": grads_unsharded(root, early_only=True),  # lm_head, final norm
    }


def _sharded_trainable_numels(s: Scenario) -> list[int]:
    """Rank 0's local element count of every trainable tensor (what the optimizer sees: DTensor local shards)."""
    W = s.distributed.world_size
    n = s.model.arch.n_layers
    layer = [t.shard_rows(W) * t.row for t in layer_unit(s) if t.trainable]
    return layer * n + [t.shard_rows(W) * t.row for t in root_unit(s) if t.trainable]


def fsdp_optimizer_bytes(s: Scenario, device: str) -> tuple[int, int]:
    """(state, step temporaries) of torch AdamW on rank 0's shards (zeros_like of each DTensor local shard:
    chunks[0] rows; optim/adamw.py) or SGD (none). CPU: fp32 0-dim `step` per tensor and the single-tensor
    path's two temporaries of the largest shard; CUDA: estimate/cuda.py (foreach)."""
    if s.training.optimizer != "adamw":
        return 0, 0
    numels = _sharded_trainable_numels(s)
    e = trainable_bytes_per_element(s)
    if device == "cuda":
        return adamw_state_bytes(numels, e), adamw_temporary_bytes(numels, e)
    return 2 * sum(numels) * e + FP32 * len(numels), 2 * max(numels, default=0) * e


def fsdp_moments(s: Scenario, device: str) -> tuple[list[tuple[str, dict[str, int]]], dict[str, int], int]:
    """(moments, terms, host_bytes). Each moment maps the breakdown categories (without the persistent sharded
    state, added by the caller) for one instant of rank 0's step:
    0. forward, at a layer's all-gather copy-out: three layer-sized buffers (see below);
    1. start of backward: the root's unsharded parameters (kept from forward), the last layer's all-gather
       buffer (prefetched by the root's pre-backward), every saved activation, the loss's logits copies;
    2. inside layer i's backward, for every i: layer i unsharded, layer i-1's prefetched all-gather buffer, the
       reduce-scatter input of layer i+1 (kept until layer i's post_backward), sharded gradients of the layers
       above, the root's gradients (unsharded until the end), layer i's own unsharded gradients;
    3. end of backward (root post_backward: reshard, then reduce-scatter of the root's gradients);
    4. optimizer step on the shards."""
    t = fsdp_terms(s, device)
    a = s.model.arch
    n, k = a.n_layers, s.training.checkpoint_every
    accum = s.training.grad_accum_steps > 1
    offload = s.distributed.cpu_offload
    grads_sharded_all = n * t["layer_grads_sharded"] + t["root_grads_sharded"]
    opt_state, opt_temps = fsdp_optimizer_bytes(s, device)
    full = s.peft.method == "full"
    root_w = t["root_unsharded_frozen"] + (t["root_unsharded_trainable"] if full else 0)
    root_tr = 0 if full else t["root_unsharded_trainable"]
    layer_w = t["layer_unsharded_frozen"] + (t["layer_unsharded_trainable"] if full else 0)
    layer_tr = 0 if full else t["layer_unsharded_trainable"]
    # sharded gradients live on the host with CPUOffloadPolicy (foreach_reduce copies them to CPU)
    dev_grads_sharded = 0 if offload else grads_sharded_all
    held_grads = dev_grads_sharded if accum else 0
    moments: list[tuple[str, dict[str, int]]] = []
    per_layer, ckpt = act_mod.activation_bytes_per_layer(s, device), act_mod.checkpoint_bytes_per_layer(s)
    held = [ckpt if k and i % k == 0 else per_layer for i in range(n)]
    held[0] -= act_mod.first_layer_unsaved_bytes(s, device)
    model_level = act_mod.model_activation_bytes(s, device) - act_mod.final_norm_saved_bytes(s, device) - \
        act_mod.lm_head_saved_bytes(s)
    # 0. forward, the copy-out of layer i's all-gather (wait_for_unshard): the previous group's flat buffer is
    # still referenced (its `prev_all_gather_state` local lives until the method returns), beside layer i's
    # flat buffer and its unsharded parameters; layers before i hold their saved tensors, and the hidden states
    # entering layer i are alive (saved by layer i only once it runs). i = 0 follows the root's all-gather,
    # i = n - 1 holds the most activations.
    stream = act_mod.activation_bytes_per_element(s) * act_mod.tokens_per_micro_batch(s) * a.hidden_size
    for i in sorted({0, n - 1}):
        prev = t["root_all_gather"] if i == 0 else t["layer_all_gather"]
        moments.append(("forward", {"weights": root_w + layer_w, "trainable": root_tr + layer_tr,
                                    "gradients": held_grads, "activations": model_level + sum(held[:i]) + stream,
                                    "temporaries": prev + t["layer_all_gather"]}))
    # 1. start of backward
    moments.append(("backward", {
        "weights": root_w, "trainable": root_tr, "gradients": held_grads,
        "activations": act_mod.activation_bytes(s, device), "logits": act_mod.logits_bytes(s),
        "temporaries": t["layer_all_gather"]}))
    # 2. inside each decoder layer's backward (activations.layer_backward_peak's scan, FSDP's gradients)
    below = sum(held)
    mlp = act_mod.mlp_saved_bytes(s, device)
    mlp_moments, attn_temps = act_mod.mlp_backward_moments(s, device), act_mod.attention_backward_temporary_bytes(s)
    logits_held = act_mod.held_logits_bytes(s)
    for i in range(n - 1, -1, -1):
        ckpt_i = bool(k) and i % k == 0
        above = (n - 1 - i) * t["layer_grads_sharded"] if not offload else 0
        grads = (held_grads if accum else above) + t["root_early_grads_unsharded"]
        comm = (t["layer_all_gather"] if i > 0 else 0) + (t["layer_reduce_scatter"] if i < n - 1 else 0)
        base = {"weights": root_w + layer_w, "trainable": root_tr + layer_tr, "logits": logits_held}
        for freed, layer_grads, temps in mlp_moments:
            moments.append(("backward", {**base, "gradients": grads + layer_grads,
                                         "activations": below + model_level - (0 if ckpt_i else freed),
                                         "temporaries": comm + (per_layer - freed if ckpt_i else 0) + temps}))
        # attention's backward: the layer's MLP gradients exist, its own come during it (counted whole: the
        # measured moment holds them all, benchmarks/results/distributed_accuracy.md)
        moments.append(("backward", {**base, "gradients": grads + t["layer_grads_unsharded"],
                                     "activations": below - (0 if ckpt_i else mlp) + model_level,
                                     "temporaries": comm + (per_layer - mlp if ckpt_i else 0) + attn_temps}))
        below -= held[i]
    # 3. end of backward: the root's post_backward (only where the root has trainable parameters)
    if t["root_grads_unsharded"]:
        layers_sharded = 0 if offload else n * t["layer_grads_sharded"]
        rs_kept = t["layer_reduce_scatter"] if n > 0 else 0
        tied_temps = 2 * mem.embedding_weight_elements(s) * trainable_bytes_per_element(s) \
            if full and a.tied_embeddings else 0
        moments.append(("backward", {"weights": root_w, "trainable": root_tr, "logits": logits_held,
                                     "gradients": layers_sharded + t["root_grads_unsharded"],
                                     "temporaries": rs_kept + tied_temps}))
        moments.append(("backward", {"logits": logits_held,
                                     "gradients": layers_sharded + t["root_grads_unsharded"],
                                     "temporaries": t["root_reduce_scatter"]}))
    # 4. optimizer step (on the host with CPUOffloadPolicy: nothing on the device but what persists)
    moments.append(("optimizer", {"gradients": dev_grads_sharded, "temporaries": 0 if offload else opt_temps}))
    host = 0
    if offload:
        host = t["sharded_frozen"] + t["sharded_trainable"] + grads_sharded_all + opt_state + opt_temps
    terms = {**t, "optimizer_state": opt_state, "optimizer_temporaries": opt_temps}
    return moments, terms, host


# ---- DDP ----

def ddp_bucket_bytes(s: Scenario, device: str) -> list[int]:
    """DDP's gradient buckets (reducer.cpp initialize_buckets: one flat tensor per bucket, in the gradients'
    dtype), filled in reverse parameter order up to 1 MiB for the first bucket and bucket_cap_mb = 25 MiB for the
    rest (distributed.py _compute_bucket_assignment_by_size)."""
    e = trainable_bytes_per_element(s)
    buckets, cur, cap = [], 0, DDP_FIRST_BUCKET_BYTES
    for numel in reversed(mem.trainable_tensors(s)):
        cur += numel * e
        if cur >= cap:
            buckets.append(cur)
            cur, cap = 0, DDP_BUCKET_CAP_BYTES
    if cur:
        buckets.append(cur)
    return [_blk(device)(b) for b in buckets]


# ---- DeepSpeed ZeRO (formulas, unmeasured) ----

def zero_optimizer_bytes_per_element(s: Scenario) -> int:
    """K of the ZeRO paper (sec. 3.1): DeepSpeed's Adam keeps fp32 momentum and variance, plus an fp32 master
    copy of parameters trained in fp16/bf16 (K = 12; 8 when the parameters are fp32 already). SGD: the master
    copy only."""
    master = FP32 if trainable_bytes_per_element(s) < FP32 else 0
    return master + (2 * FP32 if s.training.optimizer == "adamw" else 0)


def zero_terms(s: Scenario, device: str) -> tuple[dict[str, int], int]:
    """(per-rank device terms replacing the single-device persistent state, host_bytes). Partitions are flat and
    padded to a multiple of N (DeepSpeed stage_1_and_2.py / partition_parameters.py: ceil(numel / N))."""
    W, stage = s.distributed.world_size, int(s.distributed.strategy[-1])
    a = s.model.arch
    tb = trainable_bytes_per_element(s)
    trainable = sum(mem.trainable_tensors(s))
    part = math.ceil(trainable / W)
    optimizer = part * zero_optimizer_bytes_per_element(s)
    grads = mem.gradient_bytes(s) if stage == 1 else part * tb
    bucket = min(ZERO_REDUCE_BUCKET_ELEMENTS, trainable) * tb  # the reduce (ipg) bucket, gradients' dtype
    weights, train_params, gathered = mem.weight_bytes(s), mem.trainable_param_bytes(s), 0
    if stage == 3:
        tensors = list(layer_unit(s)) * a.n_layers + list(root_unit(s))
        whole = [t for t in tensors if t.numel < ZERO3_PERSISTENCE_THRESHOLD]
        parted = [t for t in tensors if t.numel >= ZERO3_PERSISTENCE_THRESHOLD]
        kept = sum(t.nbytes for t in whole) + sum(math.ceil(t.numel / W) * t.nbytes_per_element for t in parted)
        weights, train_params = kept, 0
        # fetched per submodule as it runs, the next ones prefetched up to stage3_prefetch_bucket_size elements
        biggest = max((t.nbytes for t in parted), default=0)
        prefetch = min(ZERO3_PREFETCH_BUCKET_ELEMENTS, sum(t.numel for t in layer_unit(s))) * \
            max((t.nbytes_per_element for t in parted), default=0)
        gathered = biggest + prefetch
    host = 0
    if s.distributed.cpu_offload:  # ZeRO-Offload: optimizer state, fp32 master and the fp32 gradient partition
        host = optimizer + part * FP32 + (weights + train_params if stage == 3 else 0)
        optimizer = 0
        grads = mem.gradient_bytes(s) if stage == 1 else 0
        if stage == 3:
            weights, train_params = 0, 0
    return {"weights": weights, "trainable": train_params, "gradients": grads, "optimizer": optimizer,
            "reduce_bucket": bucket, "gathered_params": gathered}, host


def unmeasured_note(s: Scenario) -> str | None:
    """What of this per-rank estimate no measurement here has checked (None: FSDP2/DDP on CPU, checked by
    benchmarks/distributed_accuracy.py)."""
    d = s.distributed
    notes = []
    if d.strategy.startswith("zero"):
        notes.append(f"{d.strategy}: ZeRO formulas (paper and DeepSpeed defaults), unmeasured: DeepSpeed does not run here")
    if d.cpu_offload:
        notes.append("cpu_offload: host/device split from the libraries' code, unmeasured (a CPU run has no device)")
    return "; ".join(notes) or None
