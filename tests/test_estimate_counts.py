"""Parameter counts, quantization storage and optimizer state against real transformers/peft/bitsandbytes."""

import math

import bitsandbytes as bnb
import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from peftprof.errors import UserError
from peftprof.estimate import memory as mem
from peftprof.scenario import load_scenario

# Small architectures covering MHA/GQA/MQA, tied/untied embeddings, biases, Conv1D and OPT's projections.
ARCHES = {
    "llama-mha-untied": 'model_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
                        'intermediate_size = 160\nvocab_size = 1000\n',
    "llama-gqa-tied": 'model_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
                      'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 1000\ntie_word_embeddings = true\n',
    "gemma-mqa": 'model_type = "gemma"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
                 'num_key_value_heads = 1\nhead_dim = 32\nintermediate_size = 160\nvocab_size = 1000\n',
    "qwen2-bias": 'model_type = "qwen2"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
                  'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 1000\n',
    "mistral": 'model_type = "mistral"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
               'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 1000\n',
    "gpt2": 'model_type = "gpt2"\nn_embd = 64\nn_layer = 2\nn_head = 4\nvocab_size = 1000\nn_positions = 256\n',
    "opt-proj": 'model_type = "opt"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nffn_dim = 128\n'
                'vocab_size = 1000\nword_embed_proj_dim = 32\nmax_position_embeddings = 256\n'
                'do_layer_norm_before = false\n',
}
METHODS = {
    "lora-default": ('method = "lora"\nr = 4\n', lambda: LoraConfig(r=4, task_type="CAUSAL_LM")),
    "lora-all-linear": ('method = "lora"\nr = 4\ntarget_modules = "all-linear"\n',
                        lambda: LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")),
    "ia3": ('method = "ia3"\n', lambda: IA3Config(task_type="CAUSAL_LM")),
    "prompt": ('method = "prompt_tuning"\nnum_virtual_tokens = 7\n',
               lambda: PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    "prefix": ('method = "prefix_tuning"\nnum_virtual_tokens = 7\n',
               lambda: PrefixTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    "full": ('method = "full"\n', None),
}


def scenario(write_scenario, arch: str, peft: str = "", precision: str = 'weights = "fp32"\n', training: str = ""):
    text = f"[model]\n{arch}[precision]\n{precision}[peft]\n{peft}[training]\nseq_len = 32\n{training}"
    (s,) = load_scenario(write_scenario(text))
    return s


def real_model(s, dtype=torch.float32):
    cfg = dict(s.model.config)
    conf = CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf, dtype=dtype)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_trainable_and_total_counts_match_peft(write_scenario, arch, method):
    text, make_config = METHODS[method]
    if arch == "opt-proj" and method == "prompt":
        # peft sizes prompts by hidden_size, which OPT-350m-style 32-wide embeddings cannot take: refused upfront
        with pytest.raises(UserError, match="peft sizes prompt embeddings by hidden_size 64"):
            scenario(write_scenario, ARCHES[arch], text)
        return
    s = scenario(write_scenario, ARCHES[arch], text)
    with torch.device("meta"):
        model = real_model(s)
    assert s.model.arch.n_params == sum(p.numel() for p in model.parameters())
    if make_config is not None:
        model = get_peft_model(model, make_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(mem.trainable_tensors(s)) == sum(p.numel() for p in trainable)
    assert sorted(mem.trainable_tensors(s)) == sorted(p.numel() for p in trainable)
    assert mem.trainable_bytes_per_element(s) == trainable[0].element_size()


def test_lora_counts_on_the_facts_model(write_scenario):
    # shared/facts.md: tiny llama, LoRA r=8 q,v = 32,768; IA3 default 4,800; prompt 20 = 5,120; prefix 20 = 40,960
    for peft, expected in [('r = 8\ntarget_modules = ["q_proj", "v_proj"]\n', 32_768), ('method = "ia3"\n', 4_800),
                           ('method = "prompt_tuning"\nnum_virtual_tokens = 20\n', 5_120),
                           ('method = "prefix_tuning"\nnum_virtual_tokens = 20\n', 40_960)]:
        (s,) = load_scenario(write_scenario(f'[model]\npreset = "tiny-llama"\n[peft]\n{peft}'))
        assert sum(mem.trainable_tensors(s)) == expected


def bnb_bytes(layer) -> int:
    """Bytes of a quantized bitsandbytes layer's real tensors: weight plus its quantization state."""
    w = layer.weight
    total = w.numel() * w.element_size()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return total + layer.weight.SCB.numel() * 4
    qs = w.quant_state
    tensors = [qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
    return total + sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("weights,dq,block", [("nf4", False, 64), ("nf4", True, 64), ("fp4", False, 128),
                                              ("fp4", True, 64), ("nf4", True, 256), ("int8", False, 64)])
def test_quantized_storage_equals_bitsandbytes_tensors(write_scenario, weights, dq, block):
    prec = f'weights = "{weights}"\ncompute_dtype = "bf16"\n'
    if weights != "int8":
        prec += f"double_quant = {str(dq).lower()}\nquant_block_size = {block}\n"
    s = scenario(write_scenario, ARCHES["llama-gqa-tied"], 'method = "lora"\n', prec)
    real = 0
    for spec in mem.quantized_linears(s.model.arch):
        torch.manual_seed(0)
        if weights == "int8":
            layer = bnb.nn.Linear8bitLt(spec.in_features, spec.out_features, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(spec.in_features, spec.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=dq, quant_type=weights)
            # Linear4bit takes no block size; Params4bit does
            layer.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, blocksize=block,
                                             compress_statistics=dq, quant_type=weights)
        real += bnb_bytes(layer.to("cpu"))
    predicted = mem.quant_constant_bytes(s) + sum(
        math.ceil(spec.n_weight_params / (2 if weights != "int8" else 1)) for spec in mem.quantized_linears(s.model.arch))
    assert predicted == real


def test_qlora_paper_bits_per_parameter(write_scenario):
    # QLoRA (Dettmers et al. 2023) sec. 2: block 64 constants cost 32/64 = 0.5 bit/param; double quantization
    # 8/64 + 32/(64*256) = 0.127 bit/param. A 4096x4096 layer (facts.md: 1,048,576 B absmax; DQ 262,144 + 4,096).
    arch = ('model_type = "llama"\nhidden_size = 4096\nnum_hidden_layers = 1\nnum_attention_heads = 32\n'
            'intermediate_size = 4096\nvocab_size = 1000\n')
    for dq, bits in [(False, 0.5), (True, 0.127)]:
        precision = f'weights = "nf4"\ncompute_dtype = "bf16"\ndouble_quant = {str(dq).lower()}\n'
        s = scenario(write_scenario, arch, "", precision)
        n = sum(spec.n_weight_params for spec in mem.quantized_linears(s.model.arch))
        assert mem.quant_constant_bytes(s) * 8 / n == pytest.approx(bits, abs=0.0015)


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_optimizer_state_equals_real_state_after_one_step(write_scenario, optimizer, method):
    peft = 'method = "lora"\nr = 8\ntarget_modules = "all-linear"\n' if method == "lora" else 'method = "full"\n'
    s = scenario(write_scenario, ARCHES["llama-gqa-tied"], peft, 'weights = "bf16"\n',
                 f'optimizer = "{optimizer}"\n')
    model = real_model(s, torch.bfloat16)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optimizer]
    opt = cls(params, lr=1e-3)
    ids = torch.randint(0, 1000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    resident, paged = mem.optimizer_state_bytes(s, device="cpu")
    assert paged == 0
    assert resident == _state_bytes(opt)


def test_paged_states_leave_the_allocator_on_cuda(write_scenario):
    # bitsandbytes get_state_buffer pages states of tensors with >= 1e5 values; 8-bit: uint8 state + fp32 absmax/256
    s = scenario(write_scenario, 'model_type = "llama"\nhidden_size = 512\nnum_hidden_layers = 1\n'
                 'num_attention_heads = 4\nintermediate_size = 512\nvocab_size = 1000\n', 'method = "full"\n',
                 'weights = "bf16"\n', 'optimizer = "paged_adamw_8bit"\n')
    resident, paged = mem.optimizer_state_bytes(s, device="cuda")
    # tensors >= 1e5: embedding 512,000; lm_head 512,000; 7 linears of 262,144 each (512x512)
    big = [512_000, 512_000] + [262_144] * 7
    assert paged == sum(2 * n for n in big)  # only state1/state2 are paged (uint8, one byte per value)
    # resident: absmax1/2 of the big tensors (fp32 per 256 values, each rounded up to the allocator's 512 B),
    # 3 norm weights of 512 (< 4096 -> two fp32 states) and the two shared 256-entry maps
    assert resident == 2 * 2 * 8192 + 7 * 2 * 4096 + 3 * 2 * 512 * 4 + 2 * 256 * 4  # 104,448


def test_default_target_tables_equal_peft_constants():
    """The family registry's peft defaults are peft's own (peft/utils/constants.py); a family peft has no entry for
    has none, and mixtral's IA3 entry names "w2", a module transformers 5 no longer builds: none either."""
    from peft.utils import constants

    from peftprof.families import REGISTRY

    tables = {"lora_targets": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
              "ia3_targets": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
              "ia3_feedforward": constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING}
    stale = {("mixtral", "ia3_targets"), ("mixtral", "ia3_feedforward")}
    compared = 0
    for name, fam in REGISTRY.items():
        for attr, table in tables.items():
            ours = getattr(fam, attr)
            if (name, attr) in stale:
                assert "w2" in table[name] and ours is None
                continue
            assert (None if ours is None else list(ours)) == table.get(name), (name, attr)
            compared += ours is not None
    assert compared == 3 * 9 + 1  # llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, gpt2, opt; mixtral lora
