"""Saved tensors of a sparse mixture-of-experts block (transformers 5: modeling_mixtral.py MixtralSparseMoeBlock,
modeling_qwen2_moe.py Qwen2MoeSparseMoeBlock, modeling_qwen3_moe.py Qwen3MoeSparseMoeBlock), bytes.

Routing. The router picks the top-k experts of every token; transformers 5 runs the experts through
integrations/moe.py grouped_mm_experts_forward: the T*k token-expert pairs are sorted by expert and multiplied in
one grouped matmul per projection, so every tensor the block allocates is sized by S = T*k rows whatever the
routing. How balanced the routing is therefore does not move the memory: the estimate is exact for any routing,
uniform or skewed (tests/test_family_analytic.py measures a model whose router sends every token to the same
experts against one with random routing: equal peaks). Only FLOPs are per token-expert pair (flops.py).

Per layer, with S = T*k and I the expert intermediate size (autograd derivatives.yaml for what each op saves):
the router's softmax output (fp32, T x experts) and top-k indices; the sort permutation and the gather/scatter
indices (int64, S each); the gate_up output (S x 2I: act(gate) and the product save views of it) and the
activation's output (S x I); the down output and the routing weights the weighting mul saves (S x hidden, S);
with trained experts (full fine-tuning) also the grouped matmuls' inputs. Expert weights keep their dtype: fp32
on k-bit models (peft prepare_model_for_kbit_training upcasts them; bitsandbytes does not quantize 3-D
parameters), so their activations are fp32 there. qwen2_moe adds its shared expert (an nn.Linear SwiGLU MLP)
scaled by sigmoid(shared_expert_gate(x)). With `output_router_logits` the model keeps every layer's router logits
and the load-balancing loss saves its own softmax of them (fp32, T x experts per layer).
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario
from .widths import FP32, non_quantized_bytes_per_element

INDEX = 8  # int64 indices


def expert_bytes_per_element(s: Scenario) -> int:
    """The expert stacks' dtype: not nn.Linear, so never quantized; upcast to fp32 on bitsandbytes models and in
    the compute dtype on int4 (quanto) ones, as every other non-quantized parameter (widths.py)."""
    return non_quantized_bytes_per_element(s)


def moe_block_saves(s: Scenario, linear, lin_out: int, T: int, device: str) -> dict[str, int]:
    a = s.model.arch
    E, k, inter, h = a.n_experts, a.experts_per_token, a.moe_intermediate_size, a.hidden_size
    S = T * k
    ex = expert_bytes_per_element(s)
    full = s.peft.method == "full"
    router = BYTES_PER_ELEMENT[s.precision.weights] if not s.precision.is_quantized else FP32
    saved: dict[str, int] = {
        "moe.router_softmax": FP32 * T * E,
        "moe.topk_indices": INDEX * S,
        "moe.perm": INDEX * S,
        "moe.gather_index": INDEX * S,
        "moe.inv_perm": INDEX * S,
        "moe.gate_up": ex * S * 2 * inter,
        "moe.act_out": ex * S * inter,
        "moe.down_out": ex * S * h,
        # mixtral renormalises in fp32; qwen casts the weights back to the router's dtype
        "moe.routing_weights": (FP32 if a.model_type == "mixtral" else router) * S,
    }
    if a.model_type == "mixtral":  # top_value /= top_value.sum(-1, keepdim=True), in place: the original values
        # (S) and the sums (T), fp32 (autograd's in-place div keeps what its backward needs; measured)
        saved["moe.renorm"] = FP32 * (S + T)
    if full:  # trained router and experts: the grouped matmuls save their inputs (the gathered hidden states
        # in the experts' dtype, the gated product) and the router its input (x2, the norm's output)
        saved["moe.selected"] = ex * S * h
        saved["moe.mid"] = ex * S * inter
        saved["x2"] = lin_out * T * h
    if a.model_type == "qwen2_moe":
        i = a.shared_intermediate_size
        linear("gate_proj", "x2", "gate")
        linear("up_proj", "x2", "up")
        saved["moe.shared_gate"] = lin_out * T * i
        saved["moe.shared_act_out"] = lin_out * T * i
        saved["moe.shared_up"] = lin_out * T * i
        linear("down_proj", "mlp_mid", "down")
        linear("shared_expert_gate", "x2", "shared_expert_gate")
        # sigmoid saves its output (T x 1), the scaling mul both factors: the shared expert's output (T x h)
        saved["moe.sigmoid"] = lin_out * T
        saved["moe.shared_out"] = lin_out * T * h
    return saved


def router_logits_bytes(s: Scenario, T: int) -> int:
    """`output_router_logits`: each layer's router logits (T x experts, the router's dtype), kept by the model
    output for the load-balancing loss (load_balancing_loss_func). That loss's own softmax is freed before the
    peak: its backward runs first (measured on CPU)."""
    a = s.model.arch
    if not a.router_logits:
        return 0
    router = BYTES_PER_ELEMENT[s.precision.weights] if not s.precision.is_quantized else FP32
    return a.n_layers * T * a.n_experts * router


def moe_backward_moments(s: Scenario, saves: dict[str, int], T: int) -> list[tuple[int, int, int]]:
    """The largest moments of a MoE block's backward, as activations.mlp_backward_moments gives them (saved bytes
    freed, gradient bytes made, temporaries): the down grouped matmul's backward (the gradients of its output and
    input, S x hidden and S x I, the weighting mul's saves freed), then act(gate) * up's (the incoming gradient and
    both factors' gradients, concatenated into the gate_up gradient: S x 4I). Trained experts (full fine-tuning)
    add their gradients (the whole stacks) at the grouped matmuls."""
    a = s.model.arch
    S = T * a.experts_per_token
    ex = expert_bytes_per_element(s)
    inter, h = a.moe_intermediate_size, a.hidden_size
    grads = 0
    if s.peft.method == "full":
        grads = sum(p.numel for p in a.layer_params if p.path.endswith("down_proj")) * ex
    down_freed = saves.get("moe.down_out", 0) + saves.get("moe.routing_weights", 0) + saves.get("moe.mid", 0)
    gate_freed = down_freed + saves.get("moe.act_out", 0)
    return [(down_freed, grads, ex * S * (h + inter)), (gate_freed, grads, ex * S * 4 * inter)]


def moe_analytic_gap(s: Scenario) -> str | None:
    """What of a MoE variant the analytic estimator does not model (None: it does): adapters on the experts or the
    router. peft 0.21 wraps both under target_modules="all-linear" on transformers 5 MoE models (the experts as
    3-D parameters, ParamWrapper; measured with the trace), and a target naming them does the same."""
    a, m = s.model.arch, s.peft
    if not a.n_experts or m.method not in ("lora", "ia3") and not m.target_parameters:
        return None
    names = m.targets(a) if m.target_modules != "all-linear" else ("all-linear",)
    if m.target_modules == "all-linear" or any(t.split(".")[-1] in ("gate", "experts") for t in names):
        return (f"the analytic estimator does not model {m.method} on {a.model_type}'s experts and router "
                "(all-linear reaches them); give attention/shared-expert target_modules")
    return None


def check_moe_analytic(s: Scenario) -> None:
    gap = moe_analytic_gap(s)
    if gap:
        from . import AnalyticUnsupported

        raise AnalyticUnsupported(f"{s.name}: {gap}; --method trace answers")
