"""Offloading (`[inference] max_memory`) as accelerate does it: which modules stay on the device, which go to
disk, what the device holds at the peak and what every forward reads back from disk. Bytes throughout.

The placement is accelerate's greedy rule (accelerate 1.15 utils/modeling.py infer_auto_device_map,
_init_infer_auto_device_map, get_max_layer_size, get_module_size_with_ties, clean_device_map) re-implemented
on the served model's module tree, built from the Arch (no model, no accelerate call): tests/test_offload.py
compares it with accelerate's own map on meta-built models. The runner (run/infer.py offload) and the trace
call accelerate itself.

At run time (accelerate hooks.py AlignDevicesHook, attach_align_device_hook): every module with parameters of
its own inside an offloaded block gets a hook that, before the module runs, loads each of its parameters from
the offload folder (utils/offload.py load_offloaded_weight: torch.tensor(np.memmap), one copy, then
set_module_tensor_to_device: no further copy on the same device) and puts them back on `meta` after it ran
(freed). Buffers stay on the device (offload_buffers=False). So at any moment at most one leaf module's
parameters are loaded, and a forward reads every offloaded parameter that runs once (an inactive adapter never
runs, so it is never read). Measured: run/infer.py marking_offload_loads, tests/test_offload.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import BYTES_PER_ELEMENT, Scenario
from .widths import ADAPTER_BYTES_PER_ELEMENT

CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


@dataclass(frozen=True)
class Node:
    """A module (children a tuple) or a parameter (children None) of the served model: full name, class name,
    bytes of every tensor under it (parameters and buffers, a tied parameter counted once, where
    named_parameters first meets it: accelerate compute_module_sizes)."""

    name: str
    cls: str
    size: int
    children: tuple[Node, ...] | None = ()


def _leaf(name: str, cls: str, size: int) -> Node:
    return Node(name, cls, size, ())


def _module(name: str, cls: str, children: list[Node]) -> Node:
    return Node(name, cls, sum(c.size for c in children), tuple(children))


def _adapter_bytes_per_layer(s: Scenario) -> dict[str, int]:
    """Adapter bytes of each targeted linear of one decoder layer (path -> bytes): LoRA A (r x in) and
    B (out x r) per resident adapter, fp32 (peft autocast_adapter_dtype); none when merged or bare."""
    m = s.peft
    if m.method != "lora" or s.inference.merged:
        return {}
    a = s.model.arch
    return {spec.path: m.num_adapters * m.r * (spec.in_features + spec.out_features) * ADAPTER_BYTES_PER_ELEMENT
            for spec in m.targeted_linears(a) if spec in a.layer_linears}


def served_tree(s: Scenario) -> tuple[Node, str]:
    """(root, prefix) of the served model as peft and transformers build it: PeftModelForCausalLM ->
    base_model (LoraModel) -> model (XForCausalLM) when adapters are resident, else XForCausalLM; children in
    registration order (modeling_llama.py: model = embed_tokens, layers, norm, rotary_emb; then lm_head).
    A decoder layer is one no-split node (its linears, norms and adapters); rotary_emb holds inv_freq and
    original_inv_freq (head_dim / 2 fp32 each). `prefix` is the causal LM's name ('' or 'base_model.model.')."""
    a = s.model.arch
    e = BYTES_PER_ELEMENT[s.precision.weights]
    cls = CLASS_PREFIX[a.model_type]
    wrapped = s.peft.method != "full" and not s.inference.merged
    p = "base_model.model." if wrapped else ""
    adapters = _adapter_bytes_per_layer(s)
    linears = sum(spec.n_weight_params + (spec.out_features if spec.bias else 0) for spec in a.layer_linears)
    layer_bytes = (linears + a.hidden_size * a.n_norms_per_layer) * e + sum(adapters.values())
    layers = [_leaf(f"{p}model.layers.{i}", f"{cls}DecoderLayer", layer_bytes) for i in range(a.n_layers)]
    model = _module(f"{p}model", f"{cls}Model", [
        _leaf(f"{p}model.embed_tokens", "Embedding", a.vocab_size * a.hidden_size * e),
        _module(f"{p}model.layers", "ModuleList", layers),
        _leaf(f"{p}model.norm", f"{cls}RMSNorm", a.hidden_size * e),
        _leaf(f"{p}model.rotary_emb", f"{cls}RotaryEmbedding", a.head_dim // 2 * 4 * 2)])
    lm_head = _leaf(f"{p}lm_head", "Linear", 0 if a.tied_embeddings else a.vocab_size * a.hidden_size * e)
    causal = _module(p.rstrip(".") if p else "", f"{cls}ForCausalLM", [model, lm_head])
    if not wrapped:
        return causal, p
    lora = Node("base_model", "LoraModel", causal.size, (Node("base_model.model", causal.cls, causal.size,
                                                                causal.children),))
    return Node("", "PeftModelForCausalLM", lora.size, (lora,)), p


def _max_layer(nodes: list[Node]) -> tuple[int, list[str]]:
    """accelerate get_max_layer_size: the largest module that is not split (no children or no-split)."""
    best, names = 0, []
    todo = list(nodes)
    while todo:
        n = todo.pop(0)
        if not n.children or n.cls.endswith("DecoderLayer"):
            if n.size > best:
                best, names = n.size, [n.name]
            elif n.size == best:
                names.append(n.name)
        else:
            todo = list(n.children) + todo
    return best, names


def device_map(s: Scenario, cap: int, device: str = "cpu") -> dict[str, str]:
    """accelerate infer_auto_device_map(model, max_memory={device: cap, "disk": unlimited},
    no_split_module_classes=[decoder layer]) without cleaning: name -> `device` or "disk". The device keeps
    room for the largest layer not yet placed (its reserve, recomputed once that layer is placed); modules go
    in order while they fit, a module that does not fit is split into its children unless it is a decoder layer
    or has none, and once one cannot be placed everything after it goes to disk. A tied lm_head follows the
    embedding (both share one tensor, counted under embed_tokens)."""
    root, p = served_tree(s)
    tied = [f"{p}model.embed_tokens.weight", f"{p}lm_head.weight"] if s.model.arch.tied_embeddings else []
    todo = list(root.children)
    devices = [device, "disk"]
    used = {device: 0, "disk": 0}
    current = 0
    out: dict[str, str] = {}
    reserve, reserve_names = _max_layer(todo)
    while todo:
        node = todo.pop(0)
        reserve_names = [n for n in reserve_names if n != node.name and not n.startswith(node.name + ".")]
        if not reserve_names:
            reserve, reserve_names = _max_layer([n for n in todo if n.children is not None])
        here = devices[current]
        inside = [t for t in tied if (t + ".").startswith(node.name + ".") or not node.name]
        partner = [t for t in tied if t not in inside] if inside and len(inside) < len(tied) else []
        partner_nodes = [n for n in todo if any(t.startswith(n.name + ".") for t in partner)]
        with_ties = node.size + sum(n.size for n in partner_nodes)  # minus the tied tensor: counted 0 there
        if here == "disk" or used[here] + with_ties <= cap - reserve:
            used[here] += with_ties
            out[node.name] = here
            for n in partner_nodes:
                todo.remove(n)
                out[n.name] = here
            continue
        if node.children and not node.cls.endswith("DecoderLayer") and used[here] + node.size >= cap - reserve:
            todo = list(node.children) + todo
            reserve, reserve_names = _max_layer([n for n in todo if n.children is not None])
            continue
        used[here] += reserve
        current += 1
        todo.insert(0, node)
    return out


def placement_of(name: str, dmap: dict[str, str]) -> str:
    """Where a module or tensor named `name` lives: its longest prefix in the device map."""
    best = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    return "?" if best is None else dmap[best]


@dataclass(frozen=True)
class Offload:
    """What the placement means for the request, bytes (see the module docstring)."""

    device_map: dict[str, str]
    resident_weight_bytes: int  # base parameters on the device, plus every buffer
    resident_adapter_bytes: int
    disk_bytes: int  # parameters written to the offload folder
    read_bytes_per_forward: int  # offloaded parameters that run: each read once per forward
    layers_offloaded: tuple[int, ...]
    embed_offloaded: bool
    lm_head_offloaded: bool
    layer_linear_loads: dict[str, int]  # base linear path -> bytes loaded while it runs (offloaded layers)


def offload_plan(s: Scenario, cap: int, device: str = "cpu") -> Offload:
    """The placement and its bytes for `cap` bytes of device memory."""
    a = s.model.arch
    e = BYTES_PER_ELEMENT[s.precision.weights]
    dmap = device_map(s, cap, device)
    _, p = served_tree(s)
    adapters = _adapter_bytes_per_layer(s)
    layer_base = sum(spec.n_weight_params + (spec.out_features if spec.bias else 0) for spec in a.layer_linears) * e \
        + a.hidden_size * a.n_norms_per_layer * e
    offloaded = tuple(i for i in range(a.n_layers) if placement_of(f"{p}model.layers.{i}", dmap) == "disk")
    embed_off = placement_of(f"{p}model.embed_tokens", dmap) == "disk"
    lm_off = placement_of(f"{p}lm_head", dmap) == "disk"
    norm_off = placement_of(f"{p}model.norm", dmap) == "disk"
    embed = a.vocab_size * a.hidden_size * e
    lm = 0 if a.tied_embeddings else embed
    n_off = len(offloaded)
    base_total = a.n_params * e
    disk_base = n_off * layer_base + embed * embed_off + lm * lm_off + a.hidden_size * e * norm_off
    adapter_total = sum(adapters.values()) * a.n_layers
    disk_adapters = sum(adapters.values()) * n_off
    one_adapter = sum(adapters.values()) // max(1, s.peft.num_adapters)
    # a tied lm_head reads its weight under its own name (offload_state_dict writes the state dict, which
    # names a tied tensor twice)
    read = n_off * (layer_base + one_adapter) + embed * (embed_off + lm_off) + a.hidden_size * e * norm_off
    rotary = a.head_dim // 2 * 4 * 2
    loads = {spec.path: (spec.n_weight_params + (spec.out_features if spec.bias else 0)) * e
             for spec in a.layer_linears} if offloaded else {}
    # offload_state_dict writes the state dict, which names a tied tensor twice: two files
    files = embed if a.tied_embeddings and lm_off else 0
    return Offload(device_map=dmap, resident_weight_bytes=base_total - disk_base + rotary,
                   resident_adapter_bytes=adapter_total - disk_adapters, disk_bytes=disk_base + disk_adapters + files,
                   read_bytes_per_forward=read, layers_offloaded=offloaded, embed_offloaded=embed_off,
                   lm_head_offloaded=lm_off, layer_linear_loads=loads)
