"""Issue #14: the analytic saved-tensor models of qwen3, gemma2, gemma3_text, phi3, mixtral, qwen2_moe and qwen3_moe.
Sizes computed by hand from the configs, then a few tiny configs against the CPU runner (the accuracy benchmark
holds the broad comparison)."""

import pytest

from peftprof.estimate import estimate
from peftprof.estimate.activations import layer_saves, logits_bytes, model_activation_bytes
from peftprof.estimate.flops import matmul_flops_per_token
from peftprof.scenario import load_scenario

B, S = 2, 48  # batch, sequence: T = 96 tokens
T = B * S


def _scenario(write_scenario, model: str, peft: str = "", training: str = "", precision: str = 'weights = "fp32"'):
    text = (f"[model]\n{model}\n[precision]\n{precision}\n[peft]\n{peft}\n"
            f"[training]\nbatch_size = {B}\nseq_len = {S}\n{training}\n[run]\nsteps = 1\n")
    (s,) = load_scenario(write_scenario(text))
    return s


QWEN3 = ('model_type = "qwen3"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
         "num_key_value_heads = 2\nhead_dim = 24\nintermediate_size = 96\nvocab_size = 300")


def test_qwen3_q_and_k_norms_save_their_fp32_input_and_rsqrt(write_scenario):
    # bf16 model: RMSNorm upcasts q (b x s x heads x head_dim) to fp32 and saves it with rsqrt per head and token
    s = _scenario(write_scenario, QWEN3, precision='weights = "bf16"')
    saves = layer_saves(s)
    assert saves["self_attn.q_norm.in_fp32"] == B * S * 4 * 24 * 4
    assert saves["self_attn.q_norm.rsqrt"] == B * S * 4 * 4
    assert saves["self_attn.k_norm.in_fp32"] == B * S * 2 * 24 * 4
    assert saves["self_attn.k_norm.rsqrt"] == B * S * 2 * 4
    assert "self_attn.q_norm.normed" not in saves  # frozen norm weight: nothing for its gradient
    full = layer_saves(_scenario(write_scenario, QWEN3, 'method = "full"', precision='weights = "bf16"'))
    assert full["self_attn.q_norm.normed"] == B * S * 4 * 24 * 2  # weight * x.to(bf16) saves the bf16 x


GEMMA2 = ('model_type = "gemma2"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
          "num_key_value_heads = 2\nhead_dim = 16\nintermediate_size = 96\nvocab_size = 300")


def test_gemma2_four_norms_soft_capping_and_repeated_kv(write_scenario):
    s = _scenario(write_scenario, GEMMA2)  # fp32, eager (gemma2's only attention), LoRA q/v
    saves = layer_saves(s)
    for norm in ("input_layernorm", "attn_post_norm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert saves[f"{norm}.in_fp32"] == T * 64 * 4 and saves[f"{norm}.rsqrt"] == T * 4
        assert saves[f"{norm}.one_plus_w"] == 64 * 4  # x * (1 + w.float()) keeps the fp32 (1 + w)
    probs = B * 4 * S * S  # b x heads x s x s_kv
    assert saves["softcap_tanh"] == probs * 4 and saves["softmax_fp32"] == probs * 4
    assert saves["k"] == saves["v"] == T * 4 * 16 * 4  # repeat_kv: 2 kv heads copied to all 4 heads
    # final soft-capping: tanh's output beside the logits and the loss's three fp32 copies
    assert logits_bytes(s) == T * 300 * (4 + 3 * 4 + 4)


def test_gemma3_sliding_window_masks_over_the_window(write_scenario):
    model = ('model_type = "gemma3_text"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
             "num_key_value_heads = 2\nhead_dim = 16\nintermediate_size = 96\nvocab_size = 300\nsliding_window = 16")
    s = _scenario(write_scenario, model, training='attention = "sdpa"')
    assert s.model.arch.sliding_ids == (0, 1)  # 5 of every 6 layers slide
    short = _scenario(write_scenario, model.replace("sliding_window = 16", "sliding_window = 4096"),
                      training='attention = "sdpa"')
    # SDPA saves a float b x s x s mask per sliding layer once s > window (fp32 model)
    assert model_activation_bytes(s) - model_activation_bytes(short) == 2 * 4 * B * S * S


def test_phi3_fused_projections_keep_their_whole_outputs(write_scenario):
    model = ('model_type = "phi3"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
             "num_key_value_heads = 2\nintermediate_size = 96\nvocab_size = 32064")
    s = _scenario(write_scenario, model, 'target_modules = ["qkv_proj"]', 'attention = "sdpa"')
    saves = layer_saves(s)
    assert saves["v"] == T * (4 + 2 * 2) * 16 * 4  # SDPA keeps v, a view of the whole qkv output
    assert saves["gate"] == T * 2 * 96 * 4 and saves["act_out"] == T * 96 * 4


MIXTRAL = ('model_type = "mixtral"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
           "num_key_value_heads = 2\nintermediate_size = 40\nvocab_size = 300\nnum_local_experts = 4\n"
           "num_experts_per_tok = 2")


def test_mixtral_experts_save_per_token_expert_pair(write_scenario):
    s = _scenario(write_scenario, MIXTRAL, precision='weights = "bf16"')
    saves = layer_saves(s)
    pairs = T * 2  # top-2
    assert saves["moe.gate_up"] == pairs * 2 * 40 * 2  # bf16 gate_up output: act(gate) and up are views of it
    assert saves["moe.act_out"] == pairs * 40 * 2
    assert saves["moe.down_out"] == pairs * 64 * 2
    assert saves["moe.router_softmax"] == T * 4 * 4  # fp32 softmax over 4 experts
    assert saves["moe.perm"] == pairs * 8
    # k-bit models upcast the expert stacks to fp32 (prepare_model_for_kbit_training): fp32 activations
    nf4 = layer_saves(_scenario(write_scenario, MIXTRAL, precision='weights = "nf4"\ncompute_dtype = "bf16"'))
    assert nf4["moe.gate_up"] == pairs * 2 * 40 * 4
    logits = _scenario(write_scenario, MIXTRAL + "\noutput_router_logits = true", precision='weights = "bf16"')
    assert model_activation_bytes(logits) - model_activation_bytes(s) == 2 * T * 4 * 2  # bf16 logits per layer


def test_moe_flops_count_active_experts_only(write_scenario):
    s = _scenario(write_scenario, MIXTRAL)
    frozen, _ = matmul_flops_per_token(s)
    attention = 64 * 64 * 2 + 64 * 32 * 2  # q, o: 64 x 64; k, v: 64 x 32
    experts = 2 * (2 * 40 * 64 + 64 * 40)  # top-2 of the (gate_up, down) stacks
    assert frozen == 2 * (2 * (attention + experts + 4 * 64) + 300 * 64)


def test_adapters_on_experts_go_to_the_trace(write_scenario):
    from peftprof.estimate import AnalyticUnsupported

    s = _scenario(write_scenario, MIXTRAL, 'target_modules = "all-linear"')
    with pytest.raises(AnalyticUnsupported, match="does not model lora on mixtral's experts and router"):
        estimate(s, device="cpu")


@pytest.mark.parametrize("model, peft, training", [
    (QWEN3.replace('"qwen3"', '"qwen3_moe"') + "\nmoe_intermediate_size = 32\nnum_experts = 4\nnum_experts_per_tok = 2",
     'target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]', 'gradient_checkpointing = "every_2"'),
    ('model_type = "qwen2_moe"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
     "num_key_value_heads = 2\nintermediate_size = 96\nmoe_intermediate_size = 32\nshared_expert_intermediate_size = 48\n"
     "num_experts = 4\n"
     "num_experts_per_tok = 2\nvocab_size = 3000\noutput_router_logits = true",
     'target_modules = ["q_proj", "v_proj", "down_proj"]', 'attention = "eager"'),
    ('model_type = "gemma3_text"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
     "num_key_value_heads = 1\nhead_dim = 16\nintermediate_size = 96\nvocab_size = 300\nsliding_window = 16",
     'method = "full"', 'attention = "sdpa"'),
])
def test_analytic_equals_the_runner_on_tiny_configs(write_scenario, monkeypatch, tmp_path, model, peft, training):
    from peftprof.run.runner import run_variant

    monkeypatch.setenv("PEFTPROF_CACHE", str(tmp_path / "cache"))
    s = _scenario(write_scenario, model, peft, training)
    rec = run_variant(s, device="cpu", steps=1)
    assert rec["status"] == "ok", rec["error"]
    measured = rec["measured"]["peak_bytes"]
    assert abs(estimate(s, device="cpu")["peak_bytes"] - measured) <= 0.01 * measured


def test_routing_imbalance_does_not_move_the_peak(write_scenario, monkeypatch, tmp_path):
    """transformers 5 runs the experts as grouped matmuls over the T*k sorted token-expert pairs: every tokens
    sent to the same two experts allocates what random routing does (estimate/moe.py). Measured: a router
    forced to experts 0 and 1 against the random one."""
    import torch
    from transformers.models.mixtral import modeling_mixtral

    from peftprof.run.runner import run_variant

    monkeypatch.setenv("PEFTPROF_CACHE", str(tmp_path / "cache"))
    s = _scenario(write_scenario, MIXTRAL)
    random_peak = run_variant(s, device="cpu", steps=1)["measured"]["peak_bytes"]
    original = modeling_mixtral.MixtralTopKRouter.forward

    def skewed(self, hidden_states):
        logits, scores, _ = original(self, hidden_states)
        return logits, scores, torch.tensor([0, 1]).expand(scores.shape[0], 2).contiguous()

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", skewed)
    rec = run_variant(s, device="cpu", steps=1)
    assert rec["status"] == "ok", rec["error"]
    assert rec["measured"]["peak_bytes"] == random_peak
    assert abs(estimate(s, device="cpu")["peak_bytes"] - random_peak) <= 0.01 * random_peak


def test_target_parameters_must_name_expert_stacks(write_scenario):
    from click.testing import CliRunner

    from peftprof.cli import cli

    bad = write_scenario(f'[model]\n{MIXTRAL}\n[peft]\ntarget_parameters = ["experts.down_proj", "experts.up"]\n')
    result = CliRunner().invoke(cli, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {bad}: [peft] target_parameters: experts.up matches no expert parameter of "
                             "mixtral (allowed: mlp.experts.gate_up_proj, mlp.experts.down_proj)\n")
    dense = write_scenario(f'[model]\n{QWEN3}\n[peft]\ntarget_parameters = ["experts.down_proj"]\n', "d.toml")
    result = CliRunner().invoke(cli, ["validate", str(dense)])
    assert result.exit_code == 2 and "of qwen3 (a dense model: it has none)" in result.stderr
    good = write_scenario(f'[model]\n{MIXTRAL}\n[peft]\ntarget_parameters = ["mlp.experts.gate_up_proj"]\n', "g.toml")
    assert CliRunner().invoke(cli, ["validate", str(good)]).exit_code == 0

