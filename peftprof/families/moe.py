"""Shared pieces of the mixture-of-experts families (transformers 5: modeling_mixtral.py MixtralExperts,
MixtralTopKRouter; modeling_qwen2_moe.py; modeling_qwen3_moe.py). The experts of a layer are two 3-D
nn.Parameters, gate_up_proj (experts, 2 x moe_intermediate, hidden) and down_proj (experts, hidden,
moe_intermediate); the router is a bare (experts, hidden) weight. None of them is an nn.Linear: peft's
"all-linear" and bitsandbytes' Linear replacement reach only the attention (and shared-expert) linears;
LoRA on the experts goes through peft's `target_parameters`."""

from .base import ParamSpec


def expert_params(n_experts: int, hidden: int, inter: int, prefix: str = "mlp") -> tuple[ParamSpec, ...]:
    return (ParamSpec(path=f"{prefix}.gate.weight", shape=(n_experts, hidden)),
            ParamSpec(path=f"{prefix}.experts.gate_up_proj", shape=(n_experts, 2 * inter, hidden), expert=True),
            ParamSpec(path=f"{prefix}.experts.down_proj", shape=(n_experts, hidden, inter), expert=True))


def check_uniform(cfg: dict) -> None:
    """peftprof models decoders whose layers are all alike: every layer sparse."""
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1:
        raise ValueError(f"decoder_sparse_step {step}: layers with and without experts are not modelled "
                         "(allowed: 1)")
