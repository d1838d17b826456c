"""Analytic ResNet step memory: the step replayed op by op on sizes alone (no torch), as autograd runs it.

ResNet is a chain of blocks with one branch each (transformers/models/resnet/modeling_resnet.py), so what is live
when follows from a few rules, each from autograd's formulas (tools/autograd/derivatives.yaml) or a measurement
(the trace, tests/test_vision.py):
- forward: a module's input stays referenced by its caller until the module returns (ResNetModel keeps the stem's
  output through the encoder, a stage and a block their input); a frozen conv saves nothing for its input's
  gradient; peft's LoRA conv computes base(x) + lora_B(lora_A(x)) * scaling (peft/tuners/lora/layer.py _ConvNd)
  and lora_B saves lora_A's r-channel output; BatchNorm saves its input and two fp32 per-channel statistics,
  ReLU its output, MaxPool its input and int64 indices, when their input needs a gradient.
- backward: nodes run in reverse creation order (the shortcut before the block's layers); each allocates the
  gradients of its inputs that need one and frees its saved tensors; two gradients of one tensor are summed into
  a new one (the LoRA conv's base and lora_A input gradients; a block's two branches).
The peak is the largest total over the replay. fp32 only (estimate.py refuses the rest).
"""

from __future__ import annotations

from .arch import ConvSpec, VisionArch

FP32, INT64 = 4, 8


class Replay:
    """Live bytes through the step: tensors saved for backward (counted per saving node), other transients, and
    parameter gradients; the largest total and what made it."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.kind: dict[int, str] = {}  # "activations" (made in forward), "temporaries" (in backward), "logits"
        self.saves: dict[int, int] = {}
        self.n = 0
        self.grads = 0
        self.phase = "forward"
        self.count_grads = True
        self.peak_at = {"activations": 0, "temporaries": 0, "logits": 0, "gradients": 0, "phase": "forward"}

    def alloc(self, nbytes: int, kind: str | None = None) -> int:
        self.n += 1
        self.live[self.n] = nbytes
        self.kind[self.n] = kind or ("activations" if self.phase == "forward" else "temporaries")
        self._check()
        return self.n

    def save(self, t) -> None:
        """One more node saves t for backward (a tensor outside the step, t = None, is not counted)."""
        if t is not None:
            self.saves[t] = self.saves.get(t, 0) + 1

    def unsave(self, *ts) -> None:
        """A node's backward has run: it drops what it saved; a tensor no node saves any more is freed."""
        for t in ts:
            if t is not None and t in self.saves:
                self.saves[t] -= 1
                if not self.saves[t]:
                    del self.saves[t]
                    self.live.pop(t, None)

    def release(self, *ts) -> None:
        """The step's code drops a reference: freed unless saved."""
        for t in ts:
            if t is not None and t not in self.saves:
                self.live.pop(t, None)

    def grad(self, nbytes: int) -> None:
        """A parameter's gradient is made. Accumulating (count_grads False: the held gradients are counted by the
        caller), it is a new tensor added into .grad and freed (torch/csrc/autograd/functions/accumulate_grad.h)."""
        if self.count_grads:
            self.grads += nbytes
            self._check()
        else:
            self.release(self.alloc(nbytes, "temporaries"))

    def _check(self) -> None:
        total = sum(self.live.values()) + self.grads
        if total > sum(v for k, v in self.peak_at.items() if k != "phase"):
            self.peak_at = {"activations": 0, "temporaries": 0, "logits": 0, "gradients": self.grads,
                            "phase": self.phase}
            for t, b in self.live.items():
                self.peak_at[self.kind[t]] += b


def resnet_step_peak(arch: VisionArch, *, batch: int, adapted: set[str], r: int, full: bool,
                     count_grads: bool = True) -> dict:
    """{"activations", "temporaries", "logits", "gradients", "phase"} at the peak of forward and backward (bytes;
    as the tracker tags them: activations made in forward, temporaries in backward, logits the held output).
    `adapted`: paths of the convs and linears with LoRA; `full`: every parameter trains; `count_grads`: False when
    earlier micro-batches' gradients are live anyway (gradient accumulation: accumulated in place)."""
    rp = Replay()
    rp.count_grads = count_grads

    def size(c: int, s: int) -> int:
        return batch * c * s * s * FP32

    def conv(spec: ConvSpec, x, x_rg: bool, x_b: int):
        """A frozen, LoRA or fully trained conv on x: (output, requires grad, backward)."""
        out_b = size(spec.out_channels, spec.out_size)
        lora = spec.path in adapted
        a_out = None
        if lora:  # result = base(x) + lora_B(lora_A(x)) * scaling; lora_A saves x, lora_B its input
            base = rp.alloc(out_b)
            a_out = rp.alloc(size(r, spec.out_size))
            b_out = rp.alloc(out_b)
            scaled = rp.alloc(out_b)
            rp.release(b_out)
            out = rp.alloc(out_b)
            rp.release(scaled, base)
            rp.save(x)
            rp.save(a_out)
        else:
            out = rp.alloc(out_b)
        if full:  # the weight's gradient needs the input
            rp.save(x)

        def backward(d_out: int):
            """The input's gradient (None when it needs none); frees d_out."""
            parts = []
            if lora:  # the mul's gradient, lora_B's (input and weight), lora_A's (input and weight)
                d_scaled = rp.alloc(out_b)
                if not (x_rg or full):  # the base conv is not in the graph: the mul was d_out's only user
                    rp.release(d_out)
                d_a = rp.alloc(size(r, spec.out_size))
                rp.grad(spec.out_channels * r * FP32)
                rp.release(d_scaled)
                rp.unsave(a_out)
                rp.grad(r * spec.in_channels * spec.kernel ** 2 * FP32)
                if x_rg:
                    parts.append(rp.alloc(x_b))
                rp.release(d_a)
                rp.unsave(x)
            if x_rg:
                parts.append(rp.alloc(x_b))
            if full:
                rp.grad(spec.n_params * FP32)
                rp.unsave(x)
            rp.release(d_out)  # released by its last node before that node's outputs are summed
            return add(parts, x_b)

        return out, x_rg or lora or full, backward

    def add(parts, nbytes):
        """Two gradients of one tensor are summed into a new one."""
        if len(parts) < 2:
            return parts[0] if parts else None
        total = rp.alloc(nbytes)
        rp.release(*parts)
        return total

    def conv_layer(spec: ConvSpec, x, x_rg: bool, x_b: int, relu: bool):
        """ResNetConvLayer: conv, BatchNorm2d, ReLU or Identity: (output, requires grad, backward)."""
        c_out, rg, conv_bwd = conv(spec, x, x_rg, x_b)
        out_b = size(spec.out_channels, spec.out_size)
        n = rp.alloc(out_b)
        stats = None
        if rg:  # BatchNorm saves its input, save_mean and save_invstd
            stats = rp.alloc(2 * spec.out_channels * FP32)
            rp.save(c_out)
            rp.save(stats)
        rp.release(c_out)
        y = n
        if relu:
            y = rp.alloc(out_b)
            if rg:
                rp.save(y)
            rp.release(n)

        def backward(d_y: int, last_use: bool = False):
            """The input's gradient; d_y stays the caller's unless this is its last user (`last_use`: the engine
            frees a node's input gradient once the node has run, before the conv's backward)."""
            d = d_y
            if relu:
                d = rp.alloc(out_b)
                rp.unsave(y)
                if last_use:
                    rp.release(d_y)
            d_c = rp.alloc(out_b)
            if full:
                rp.grad(2 * spec.out_channels * FP32)
            rp.unsave(c_out, stats)
            if d is not d_y or last_use:
                rp.release(d)
            return conv_bwd(d_c)

        return y, rg, backward

    stem = arch.convs[0]
    a0, rg, stem_bwd = conv_layer(stem, None, False, 0, relu=True)
    pooled_size = (stem.out_size - 1) // 2 + 1  # MaxPool2d(3, stride 2, padding 1)
    p_b = size(stem.out_channels, pooled_size)
    p0 = rp.alloc(p_b)
    idx = None
    if rg:  # max pool saves its input and int64 indices
        idx = rp.alloc(batch * stem.out_channels * pooled_size ** 2 * INT64)
        rp.save(idx)
        rp.save(a0)
    rp.release(a0)
    nodes = []
    cur, cur_rg, cur_b = p0, rg, p_b
    for blk in _blocks(arch):
        x_in, x_rg, x_b = cur, cur_rg, cur_b
        h, h_rg, h_b = x_in, x_rg, x_b
        layer_bwds = []
        for k, spec in enumerate(blk["layers"]):
            prev = h
            h, h_rg, bwd = conv_layer(spec, h, h_rg, h_b, relu=k < len(blk["layers"]) - 1)
            if prev != x_in:
                rp.release(prev)
            layer_bwds.append(bwd)
            h_b = size(spec.out_channels, spec.out_size)
        s_bwd, s_out, s_rg = None, None, x_rg
        if blk["shortcut"] is not None:
            s_out, s_rg, s_bwd = conv_layer(blk["shortcut"], x_in, x_rg, x_b, relu=False)
        y = rp.alloc(h_b)  # hidden += residual (in place), then the block's ReLU
        y_rg = h_rg or s_rg
        if y_rg:
            rp.save(y)
        rp.release(h, s_out)
        if x_in != p0:  # ResNetModel keeps the stem's output referenced through the encoder
            rp.release(x_in)
        nodes.append((blk, y, h_b, layer_bwds, s_bwd, x_rg, x_b))
        cur, cur_rg, cur_b = y, y_rg, h_b
    rp.release(p0)
    c_last = arch.hidden_size
    pooled = rp.alloc(batch * c_last * FP32)
    rp.release(cur)
    cls = arch.linears[-1]
    cls_lora = cls.path in adapted
    a_cls = rp.alloc(batch * r * FP32) if cls_lora else None
    rp.alloc(batch * arch.num_labels * FP32, "logits")  # held by the output through backward
    if cls_lora or full:
        rp.save(pooled)
        rp.save(a_cls)
    rp.release(pooled, a_cls)
    if not (cur_rg or cls_lora or full):
        return rp.peak_at
    logp = rp.alloc(batch * arch.num_labels * FP32)  # cross entropy's log-softmax, saved
    rp.save(logp)
    rp.alloc(FP32)  # the loss
    rp.phase = "backward"
    rp.alloc(FP32)  # the loss's gradient (ones), live through backward
    d_logp = rp.alloc(batch * arch.num_labels * FP32)
    rp.unsave(logp)
    d_logits = rp.alloc(batch * arch.num_labels * FP32)
    rp.release(d_logp)
    if cls_lora:
        rp.grad((r * cls.in_features + cls.out_features * r) * FP32)
    if full:
        rp.grad((cls.in_features + 1) * cls.out_features * FP32)
    rp.unsave(a_cls, pooled)
    if not cur_rg:
        return rp.peak_at
    d_pooled = rp.alloc(batch * c_last * FP32)
    rp.release(d_logits)
    d = rp.alloc(cur_b)  # mean backward
    rp.release(d_pooled)
    for _blk, y, out_b, layer_bwds, s_bwd, x_rg, x_b in reversed(nodes):
        d_h = rp.alloc(out_b)  # the block's ReLU backward
        rp.release(d)
        rp.unsave(y)
        grads_x = []
        if s_bwd is not None:
            g = s_bwd(d_h)
            if g is not None:
                grads_x.append(g)
        elif x_rg:
            grads_x.append(d_h)  # identity shortcut: the gradient passes through
        dl = d_h
        for bwd in reversed(layer_bwds):
            last = dl != d_h or d_h not in grads_x  # the block's last BatchNorm is d_h's last user
            nxt = bwd(dl, last)
            if last:
                rp.release(dl)
            dl = nxt
            if dl is None:
                break
        if dl is not None:
            grads_x.append(dl)
        d = add(grads_x, x_b)
        if d is None:
            break
    if d is not None:  # max pool backward, then the stem
        d_a0 = rp.alloc(size(stem.out_channels, stem.out_size))
        rp.release(d)
        rp.unsave(idx, a0)
        stem_bwd(d_a0)
        rp.release(d_a0)
    return rp.peak_at


def _blocks(arch: VisionArch) -> list[dict]:
    """The residual blocks in order: their layer convs and shortcut conv (None: identity)."""
    out = []
    for c in arch.convs[1:]:
        key = c.path.rsplit(".layer.", 1)[0] if ".layer." in c.path else c.path.rsplit(".shortcut.", 1)[0]
        if not out or out[-1]["key"] != key:
            out.append({"key": key, "layers": [], "shortcut": None})
        if ".shortcut." in c.path:
            out[-1]["shortcut"] = c
        else:
            out[-1]["layers"].append(c)
    return out
