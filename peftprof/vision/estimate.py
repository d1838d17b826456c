"""Analytic estimate of an image classifier's training step, in the structure of peftprof/estimate (bytes unless
a name says otherwise). estimate/__init__.py `estimate` branches here for vision models.

Modelled: ViT (sdpa attention) and ResNet (replayed op by op: resnet_memory.py), fp32 weights, LoRA on any of
their Linear and Conv2d layers or full fine-tuning, no gradient checkpointing; CPU semantics (on CUDA the cuBLAS
workspace and the allocator's reserved bytes are added as for language models). Everything else (fp16/bf16,
eager attention, checkpointing, DoRA, modules_to_save, 8-bit optimizers) raises AnalyticUnsupported and
`--method trace` answers (its other fields: `trace_fields`).

Saved tensors follow autograd's formulas (torch/csrc/autograd/FunctionsManual.cpp, tools/autograd/
derivatives.yaml): addmm / conv save their input only when the weight needs a gradient (a LoRA layer's lora_A
saves the layer input, lora_B the rank-r intermediate); LayerNorm saves its input and fp32 mean and rstd
(B x T each) when its input or weight needs a gradient; GELU its input; CPU SDPA (flash attention) q, k, v,
the output and an fp32 logsumexp (B x heads x T). The ViT block is transformers/models/vit/modeling_vit.py.
"""

from __future__ import annotations

from ..settings import Scenario, matches_target
from .arch import ConvSpec, VisionArch
from .resnet_memory import resnet_step_peak

FP32 = 4
DEFAULT_ACT = {"vit": "gelu", "resnet": "relu"}  # the activation each model's saved tensors are written for


def _targeted(s: Scenario) -> list:
    """The Linear and Conv2d specs peft adapts: "all-linear" = every nn.Linear (classifier included: no task
    type, peft/tuners/tuners_utils.py _maybe_include_all_linear_layers), else by peft's dotted-suffix rule."""
    a: VisionArch = s.model.arch
    if s.peft.method != "lora":
        return []
    t = s.peft.target_modules
    if t == "all-linear":
        return list(a.linears)
    names = tuple(t or ())
    return [m for m in a.linears + a.convs if any(matches_target(m.path, n) for n in names)]


def lora_tensor_elements(spec, r: int) -> tuple[int, int]:
    """(A, B) element counts of one LoRA adapter (peft/tuners/lora/layer.py). Linear: A r x in, B out x r.
    Conv2d (_ConvNd.update_layer): A = Conv2d(in, r, kernel, stride, padding) -> r x in x kh x kw; B =
    Conv2d(r, out, 1x1, groups=base groups) -> out x r/groups x 1 x 1."""
    if isinstance(spec, ConvSpec):
        return r * spec.in_channels * spec.kernel * spec.kernel, spec.out_channels * (r // spec.groups)
    return r * spec.in_features, spec.out_features * r


def _all_parameter_tensors(a: VisionArch) -> list[int]:
    out = []
    for spec in a.linears:
        out += [spec.in_features * spec.out_features] + ([spec.out_features] if spec.bias else [])
    for c in a.convs:
        out += [c.n_weight_params] + ([c.out_channels] if c.bias else [])
    if a.model_type == "vit":  # cls token, positions, 2 LayerNorms per layer and the final one (weight, bias)
        out += [a.hidden_size, a.n_tokens * a.hidden_size] + [a.hidden_size] * (4 * a.n_layers + 2)
    else:  # BatchNorm weight and bias
        out += [c for c in a.batchnorm_channels for _ in range(2)]
    return out


def trainable_tensors(s: Scenario) -> list[int]:
    """Element counts of every trainable tensor (full: every parameter; LoRA: A and B per targeted module)."""
    if s.peft.method == "full":
        return _all_parameter_tensors(s.model.arch)
    return [n for spec in _targeted(s) for n in lora_tensor_elements(spec, s.peft.r)]


def unsupported(s: Scenario) -> str | None:
    """Why the analytic model does not answer this variant (None: it does)."""
    a = s.model.arch
    if a.model_type == "vit" and s.peft.method == "lora" and all(spec is a.linears[-1] for spec in _targeted(s)):
        # nothing before the classifier needs a gradient: the peak is in the forward pass, not modelled
        return "with LoRA on the classifier alone the step's peak is in the forward pass, which the analytic " \
               "vision model does not follow"
    if s.precision.weights != "fp32":
        return "the analytic vision model covers fp32 weights only (peft's fp32 adapters on fp16/bf16 layers cast)"
    if s.training.attention != "sdpa" or s.training.checkpoint_every:
        return "the analytic vision model covers sdpa attention without gradient checkpointing"
    if a.model_type == "resnet" and any(c.groups > 1 for c in a.convs):
        return "the analytic vision model covers ungrouped convolutions"
    if s.peft.method not in ("lora", "full") or s.peft.use_dora or s.peft.modules_to_save:
        return "the analytic vision model covers plain LoRA and full fine-tuning"
    if s.training.optimizer not in ("adamw", "sgd"):
        return "the analytic vision model covers the adamw and sgd optimizers"
    act = DEFAULT_ACT[a.model_type]
    if a.hidden_act != act:  # the saved tensors of other activations differ (e.g. quick_gelu saves two)
        return f"the analytic vision model covers {a.model_type} with hidden_act {act!r} only (not {a.hidden_act!r})"
    return None


def vit_saved_bytes(s: Scenario) -> tuple[int, int, int]:
    """(saved activations at the end of forward, of them what the last layer's backward has already freed when
    it reaches its GELU: the final LayerNorm's and classifier's, fc2's input and lora_A output; gradient bytes
    computed by then). fp32; B images of T = patches + 1 tokens."""
    a: VisionArch = s.model.arch
    full = s.peft.method == "full"
    adapted = {m.path for m in _targeted(s)}
    r = s.peft.r
    b, t, h, i_sz = s.training.batch_size, a.n_tokens, a.hidden_size, a.intermediate_size
    bth, bt = b * t * h * FP32, b * t * FP32
    lora_out = b * t * r * FP32  # lora_A's output, saved by lora_B

    def ad(path):
        return path in adapted

    saved = 0
    conv = a.convs[0]
    if ad(conv.path):  # lora_A output at the patch grid, saved by lora_B (the images are the batch: not counted)
        saved += b * r * conv.out_size * conv.out_size * FP32
    g = full or ad(conv.path)  # whether the embeddings' output needs a gradient
    for li in range(a.n_layers):
        p = f"vit.layers.{li}."
        q, k, v, o = (p + f"attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        fc1, fc2 = p + "mlp.fc1", p + "mlp.fc2"
        if g or full:  # layernorm_before: its input (the layer input) and mean, rstd
            saved += bth + 2 * bt
        qkv = [x for x in (q, k, v) if ad(x)]
        if qkv or full:  # the LayerNorm output, input of q/k/v (weights or lora_A need it)
            saved += bth
        saved += lora_out * len(qkv)
        g_attn = g or bool(qkv) or full
        if g_attn:  # SDPA saves q, k, v, the output and the logsumexp
            saved += 4 * bth + b * a.n_heads * t * FP32
        if ad(o):  # lora_A keeps its input, the attention output (kept by SDPA too when it records)
            saved += lora_out + (0 if g_attn else bth)
        g = g_attn or ad(o)
        if g:  # layernorm_after: the residual sum and mean, rstd
            saved += bth + 2 * bt
        if ad(fc1) or full:  # its input, the LayerNorm output
            saved += bth + (lora_out if ad(fc1) else 0)
        g = g or ad(fc1)
        if g:  # GELU saves its input, fc1's output
            saved += b * t * i_sz * FP32
        if ad(fc2) or full:  # its input, GELU's output
            saved += b * t * i_sz * FP32 + (lora_out if ad(fc2) else 0)
        g = g or ad(fc2)
    tail = 0
    if g:  # final LayerNorm: the last layer's output and mean, rstd
        tail += bth + 2 * bt
    cls = a.linears[-1]
    if ad(cls.path) or full:  # classifier input: a view of the CLS token keeps the whole LayerNorm output
        tail += bth + (b * r * FP32 if ad(cls.path) else 0)
    grads = 0
    last_fc2 = next(x for x in a.linears if x.path == f"vit.layers.{a.n_layers - 1}.mlp.fc2")
    if full or ad(last_fc2.path):  # freed by fc2's backward before GELU's: its input (and lora_A's output)
        freed = b * t * i_sz * FP32 + (lora_out if ad(last_fc2.path) else 0)
    else:
        freed = 0
    for spec in (cls, last_fc2):  # gradients computed before the last layer's GELU backward
        if ad(spec.path):
            grads += sum(lora_tensor_elements(spec, r)) * FP32
        elif full:
            grads += (spec.in_features + 1) * spec.out_features * FP32
    if full:
        grads += 2 * h * FP32  # the final LayerNorm's
    return saved + tail, tail + freed, grads


def optimizer_bytes(s: Scenario, tensors: list[int], device: str) -> tuple[int, int]:
    """(optimizer states, optimizer step temporaries) as peftprof/estimate/memory.py models them for fp32
    trainable tensors: torch AdamW exp_avg + exp_avg_sq + a 0-dim fp32 step per tensor, two temporaries of the
    largest tensor on CPU (optim/adam.py _single_tensor_adam); CUDA's foreach implementation in estimate/cuda.py;
    SGD (momentum 0) none."""
    from ..estimate import cuda

    if s.training.optimizer == "sgd":
        return 0, 0
    if device == "cuda":
        return cuda.adamw_state_bytes(tensors, FP32), cuda.adamw_temporary_bytes(tensors, FP32)
    return 2 * sum(tensors) * FP32 + FP32 * len(tensors), 2 * max(tensors, default=0) * FP32


def flops_per_step(s: Scenario) -> int:
    """Forward: 2 FLOPs per multiply-add of every Linear and Conv2d (Kaplan et al. 2020, C_fwd = 2N per token;
    a conv's weights run once per output position) plus attention's QK^T and PV (4 T^2 H per layer). Backward:
    input gradients as forward, weight gradients only for trainable weights (peftprof/estimate/flops.py)."""
    a: VisionArch = s.model.arch
    b = s.training.batch_size
    tokens = max(a.n_tokens, 1)
    frozen = 2 * b * (sum(sp.in_features * sp.out_features for sp in a.linears[:-1]) * tokens
                      + a.linears[-1].in_features * a.linears[-1].out_features
                      + sum(c.n_weight_params * c.out_size ** 2 for c in a.convs))
    attn = 4 * b * a.n_tokens ** 2 * a.hidden_size * a.n_layers if a.model_type == "vit" else 0
    trainable = 0
    if s.peft.method == "full":
        frozen, trainable = 0, frozen
    else:
        for spec in _targeted(s):
            positions = spec.out_size ** 2 if isinstance(spec, ConvSpec) else (1 if spec is a.linears[-1] else tokens)
            trainable += 2 * b * positions * sum(lora_tensor_elements(spec, s.peft.r))
    fwd = frozen + trainable + attn
    return int((fwd + (frozen + trainable) + trainable + 2 * attn) * s.training.grad_accum_steps)


def fc2_lora(s: Scenario) -> bool:
    """Whether the last layer's fc2 has LoRA: its input gradient is then the base layer's plus lora_A's, summed
    into a third B x T x intermediate tensor beside GELU's backward output (measured: trace, tests/test_vision.py)."""
    path = f"vit.layers.{s.model.arch.n_layers - 1}.mlp.fc2"
    return any(spec.path == path for spec in _targeted(s))


def memory_breakdown(s: Scenario, device: str) -> tuple[dict[str, int], str]:
    """(breakdown, peak phase): the largest of three moments of a steady step. 1. The start of backward: every
    saved tensor, the logits and log-softmax output (B x num_labels each), the loss. 2. The last encoder layer's
    MLP backward: the final LayerNorm's and classifier's saved tensors are freed, the gradients of the layer output
    (B x T x H) and of fc2's input and GELU's input (B x T x intermediate each) are live (measured: trace of
    tests/test_vision.py's tiny ViT), with the classifier's and that fc2's weight gradients. 3. The optimizer step:
    every gradient and the optimizer's temporaries."""
    from ..estimate.cuda import CUDA_CUBLAS_WORKSPACE_BYTES
    from ..results import CATEGORIES

    a: VisionArch = s.model.arch
    tensors = trainable_tensors(s)
    states, opt_temp = optimizer_bytes(s, tensors, device)
    # BatchNorm2d buffers (torch nn/modules/batchnorm.py): fp32 running_mean and running_var, int64 counter
    buffers = sum(2 * c * FP32 + 8 for c in a.batchnorm_channels)
    persistent = {"weights": a.n_params * FP32 + buffers, "quant_constants": 0,
                  "trainable": 0 if s.peft.method == "full" else sum(tensors) * FP32, "optimizer": states,
                  "overhead": CUDA_CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0}
    grads = sum(tensors) * FP32
    accum = s.training.grad_accum_steps > 1  # earlier micro-batches' gradients are live through later ones
    if a.model_type == "resnet":  # replayed op by op: peftprof/vision/resnet_memory.py
        at = resnet_step_peak(a, batch=s.training.batch_size, adapted={m.path for m in _targeted(s)}, r=s.peft.r,
                              full=s.peft.method == "full", count_grads=not accum)
        step = {k: at[k] for k in ("activations", "temporaries", "logits", "gradients")}
        if accum:
            step["gradients"] = grads
        moments = [(at["phase"], step),
                   ("optimizer", {"gradients": grads, "activations": 0, "logits": 0, "temporaries": opt_temp})]
        phase, varying = max(moments, key=lambda m: sum(m[1].values()))
        return {c: int({**persistent, **varying}[c]) for c in CATEGORIES}, phase
    saved, tail, grads_early = vit_saved_bytes(s)
    b = s.training.batch_size
    logits, loss = b * a.num_labels * FP32, FP32
    moments = [("backward", {"gradients": grads if accum else 0, "activations": saved + loss,
                             "logits": 2 * logits, "temporaries": 0})]
    if accum and s.peft.method == "full":
        # a later micro-batch, the classifier's backward: its new weight and bias gradients (added into the held
        # .grad: torch/csrc/autograd/functions/accumulate_grad.h), the logits and their gradient, its input's
        # gradient (B x H) beside every saved tensor (measured: trace)
        cls = a.linears[-1]
        moments.append(("backward", {"gradients": grads, "activations": saved + loss, "logits": 2 * logits,
                                     "temporaries": (cls.in_features + 1) * cls.out_features * FP32
                                     + b * cls.in_features * FP32 + FP32}))
    if saved - tail:  # the last layer saved something: its backward runs through the MLP
        bth, bti = b * a.n_tokens * a.hidden_size * FP32, b * a.n_tokens * a.intermediate_size * FP32
        moments.append(("backward", {"gradients": grads if accum else grads_early,
                                     "activations": saved - tail + loss, "logits": logits,
                                     "temporaries": bth + (3 if fc2_lora(s) else 2) * bti + FP32}))
        if accum and s.peft.method == "full":
            # a later micro-batch: the last fc2's weight and bias gradients are new tensors, added into the held
            # .grad (torch/csrc/autograd/functions/accumulate_grad.h), while its input is still saved and the
            # gradients of its output (B x T x H) and input (B x T x intermediate) are live (measured: trace)
            fc2 = next(x for x in a.linears if x.path == f"vit.layers.{a.n_layers - 1}.mlp.fc2")
            new_grad = (fc2.in_features + 1) * fc2.out_features * FP32
            moments.append(("backward", {"gradients": grads, "activations": saved - tail + bti + loss,
                                         "logits": logits, "temporaries": bth + bti + new_grad + FP32}))
    moments.append(("optimizer", {"gradients": grads, "activations": 0, "logits": 0, "temporaries": opt_temp}))
    phase, varying = max(moments, key=lambda m: sum(m[1].values()))
    return {c: int({**persistent, **varying}[c]) for c in CATEGORIES}, phase


def estimate(s: Scenario, *, device: str | None = None, gpu=None, mfu: float | None = None) -> dict:
    """The analytic estimate of an image classifier (the structure of peftprof.estimate.estimate); raises
    AnalyticUnsupported where the model does not answer (`unsupported`): the trace answers."""
    from ..estimate import AnalyticUnsupported
    from ..estimate.cuda import cuda_reserved_and_device_bytes
    from ..estimate.flops import DEFAULT_MFU

    if s.training.seq_len != 1:  # e.g. `fit --axis seq_len`: one sample is one image
        from ..errors import UserError

        raise UserError(f"{s.name}: seq_len does not apply to an image classifier ({s.model.arch.model_type}); "
                        "its batch is batch_size images of image_size x image_size")
    gap = unsupported(s)
    if gap:
        raise AnalyticUnsupported(f"{s.name}: {gap}; --method trace answers")
    device = device or ("cuda" if s.run.device == "auto" else s.run.device)
    breakdown, phase = memory_breakdown(s, device)
    peak = sum(breakdown.values())
    out = {"method": "analytic", "device": device, "peak_bytes": peak, "peak_phase": phase, "breakdown": breakdown,
           "paged_optimizer_bytes": 0, "n_params": s.model.arch.n_params,
           "n_trainable_params": sum(trainable_tensors(s)), "flops_per_step": flops_per_step(s),
           "tokens_per_step": images_per_step(s)}
    if device == "cuda":
        out.update(cuda_reserved_and_device_bytes(peak))
    if gpu is not None:
        out.update(_speed(out, gpu, mfu or DEFAULT_MFU, out.get("device_bytes", peak)))
    return out


def images_per_step(s: Scenario) -> int:
    """"tokens" per step of an image classifier: images (the loader sets seq_len to 1)."""
    return s.training.batch_size * s.training.grad_accum_steps


def _speed(out: dict, gpu, mfu: float, need: int) -> dict:
    step_time_s = out["flops_per_step"] / (gpu.bf16_tflops * 1e12 * mfu)
    return {"gpu": gpu.name, "fits": need <= gpu.memory_bytes, "headroom_bytes": gpu.memory_bytes - need, "mfu": mfu,
            "predicted_step_time_s": step_time_s, "predicted_tokens_per_s": out["tokens_per_step"] / step_time_s}


def trace_fields(s: Scenario, device: str, gpu, mfu: float, traced: dict) -> tuple[dict, str]:
    """The estimate's fields besides the memory breakdown when only the trace answers (trace.py
    `_trace_only_fields` branches here): parameter counts, FLOPs and speed from this module."""
    out = {"method": "trace", "device": device, "paged_optimizer_bytes": 0, "n_params": s.model.arch.n_params,
           "n_trainable_params": traced.get("n_trainable_params", sum(trainable_tensors(s))),
           "tokens_per_step": images_per_step(s), "flops_per_step": flops_per_step(s)}
    if gpu is not None:
        step_time_s = out["flops_per_step"] / (gpu.bf16_tflops * 1e12 * mfu)
        out.update(gpu=gpu.name, mfu=mfu, predicted_step_time_s=step_time_s,
                   predicted_tokens_per_s=out["tokens_per_step"] / step_time_s)
    return out, "flops_per_step from peftprof/vision/estimate.py (Linear, Conv2d and attention matmuls)"
