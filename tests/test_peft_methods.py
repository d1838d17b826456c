"""DoRA, rsLoRA, several adapters and the LoHa/LoKr/VeRA/OFT methods: trainable counts by hand and against peft's
own models, DoRA's saved tensors against the CPU runner, and the loader's refusals."""

import pytest
import torch
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.estimate import activations as act
from peftprof.estimate import estimate
from peftprof.estimate import memory as mem
from peftprof.estimate import peft_methods as pm
from peftprof.scenario import load_scenario

# hidden 64, 2 layers, GQA 4/2 heads (k/v out 32), MLP 160: every width distinct enough to catch a swapped term
ARCH = ('[model]\nmodel_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
        'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 500\n')


def scenario(write_scenario, peft: str, precision: str = 'weights = "fp32"', training: str = ""):
    text = f"{ARCH}[precision]\n{precision}\n[peft]\n{peft}\n[training]\nbatch_size = 2\nseq_len = 32\n{training}\n" \
           "[run]\nsteps = 1\nwarmup_steps = 1\n"
    (s,) = load_scenario(write_scenario(text))
    return s


def peft_trainable(s) -> list[int]:
    """Trainable tensor sizes of the real peft model the runner builds (run/build.py)."""
    from peftprof.run.build import adapt, base_model

    torch.manual_seed(0)
    model = adapt(base_model(s, "cpu"), s)
    return sorted(p.numel() for p in model.parameters() if p.requires_grad)


# hand-computed trainable counts, q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers, r = 4
HAND = {
    # LoRA A r x in + B out x r, DoRA's magnitude out: q 256 + 256 + 64, v 256 + 128 + 32
    'method = "lora"\nr = 4\nuse_dora = true': 2 * ((256 + 256 + 64) + (256 + 128 + 32)),
    # LoHa 2r(in + out): q 2*4*128 = 1024, v 2*4*96 = 768
    'method = "loha"\nr = 4': 2 * (1024 + 768),
    # LoKr: 64 = 8 x 8, 32 = 4 x 8; w1 a x c full; w2 b x d full when r >= max(b, d)/2 (4 >= 4): q 64 + 64, v 32 + 64
    'method = "lokr"\nr = 4': 2 * ((8 * 8 + 8 * 8) + (4 * 8 + 8 * 8)),
    # VeRA lambda_b (out) + lambda_d (r) per layer; the projections are frozen buffers
    'method = "vera"\nr = 4': 2 * ((64 + 4) + (32 + 4)),
    # OFT r = 4 blocks of b = 64 / 4 = 16: 4 * 16 * 15 / 2 = 480 per layer (both take a 64-wide input)
    'method = "oft"\nr = 4': 2 * (480 + 480),
}


@pytest.mark.parametrize("peft", sorted(HAND), ids=lambda p: p.split('"')[1] + ("+dora" if "dora" in p else ""))
def test_trainable_counts_by_hand_and_against_peft(write_scenario, peft):
    s = scenario(write_scenario, peft + '\ntarget_modules = ["q_proj", "v_proj"]')
    tensors = mem.trainable_tensors(s)
    assert sum(tensors) == HAND[peft]
    assert sorted(tensors) == peft_trainable(s)


@pytest.mark.parametrize("method", ["lokr", "loha", "vera", "oft", "lora"])
def test_all_linear_counts_against_peft(write_scenario, method):
    """Every linear of the layer (in 64/160, out 32/64/160): LoKr's factorization of 160 = 10 x 16 and its
    low-rank w2 branch (r 2 < 16/2) included."""
    extra = "\nuse_dora = true" if method == "lora" else ""
    s = scenario(write_scenario, f'method = "{method}"\nr = 2\ntarget_modules = "all-linear"{extra}')
    assert sorted(mem.trainable_tensors(s)) == peft_trainable(s)


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization

    for n in (1, 7, 32, 64, 96, 127, 160, 352, 688, 4096, 11008, 14336):
        assert pm.lokr_factorization(n) == factorization(n)


def test_vera_projections_and_resident_adapters_against_the_real_model(write_scenario):
    from peftprof.run.build import build

    s = scenario(write_scenario, 'method = "vera"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]')
    model = build(s, "cpu").model
    buffers = [b for n, b in model.named_buffers() if ".vera_A." in n or ".vera_B." in n
               or n.startswith(("base_model.vera_A", "base_model.vera_B"))]
    distinct = {b.untyped_storage().data_ptr(): b.numel() for b in buffers}
    assert sum(distinct.values()) == pm.vera_projection_elements(s.peft, s.model.arch) == 4 * (64 + 64)

    s3 = scenario(write_scenario, 'method = "lora"\nr = 4\nnum_adapters = 3\nuse_dora = true')
    built = build(s3, "cpu")
    frozen_adapter = [p for n, p in built.model.named_parameters() if "resident_" in n]
    assert all(not p.requires_grad for p in frozen_adapter)
    assert sum(p.numel() * p.element_size() for p in frozen_adapter) == pm.frozen_adapter_bytes(s3)
    # two resident copies of the trained adapter (fp32): 2 x 4 B x its 2 x (576 + 416) values
    assert pm.frozen_adapter_bytes(s3) == 2 * 4 * 2 * (576 + 416)
    trained = [p for p in built.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == sum(mem.trainable_tensors(s3))
    assert built.wrapped_bytes - built.base_bytes == mem.trainable_param_bytes(s3) + pm.frozen_adapter_bytes(s3)


def test_dora_saved_tensors_against_the_runner(write_scenario):
    """DoRA's extra saved tensors per adapted linear (base output, lora_B output, three out-sized vectors) and its
    magnitude vectors, against the CPU runner's measurement of LoRA and DoRA on the same model: the analytic
    difference equals the measured one to the byte, and the peak is within 0.1%."""
    from peftprof.run.runner import run_variant

    common = 'method = "lora"\nr = 4\ntarget_modules = "all-linear"'
    lora = scenario(write_scenario, common)
    dora = scenario(write_scenario, common + "\nuse_dora = true")
    measured = {}
    for s in (lora, dora):
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", rec.get("error")
        measured[s.peft.use_dora] = rec["measured"]
    analytic = {s.peft.use_dora: estimate(s, device="cpu") for s in (lora, dora)}
    for key in ("activations", "trainable", "optimizer"):
        assert (analytic[True]["breakdown"][key] - analytic[False]["breakdown"][key]
                == measured[True]["breakdown"][key] - measured[False]["breakdown"][key]), key
    assert abs(analytic[True]["peak_bytes"] / measured[True]["peak_bytes"] - 1) < 0.001
    # by hand, one decoder layer: T = 64 tokens, outputs q 64, k 32, v 32, o 64, gate 160, up 160, down 64 (576)
    saves = act.layer_saves(dora)
    dora_keys = {k: v for k, v in saves.items() if ".dora_" in k}
    assert sum(dora_keys.values()) == 2 * 4 * 64 * 576 + 3 * 4 * 576


def test_dora_dropout_on_bf16_saves_an_fp32_weight_copy(write_scenario):
    """With lora_dropout > 0, DoRA recomputes the base output from an fp32 copy of a non-fp32 weight and saves
    that copy (peft lora/dora.py); layer 0's q/k/v inputs need no gradient, so there it saves none. DoRA's
    increment over LoRA with the same dropout, modelled vs traced (the trace equals the CPU runner,
    tests/test_runner.py)."""
    from peftprof.trace import trace_peak

    base = 'method = "lora"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]\ndropout = 0.1'
    dora = scenario(write_scenario, base + "\nuse_dora = true", precision='weights = "bf16"')
    lora = scenario(write_scenario, base, precision='weights = "bf16"')
    assert act.layer_saves(dora)["self_attn.q_proj.dora_weight"] == 4 * 64 * 64
    assert act.layer_saves(dora)["self_attn.v_proj.dora_weight"] == 4 * 32 * 64
    traced = trace_peak(dora)["breakdown"]["activations"] - trace_peak(lora)["breakdown"]["activations"]
    modelled = act.activation_bytes(dora) - act.activation_bytes(lora)
    assert modelled == traced
    # per layer: fp32 base output and lora_B output (T x out each), three fp32 out vectors; layer 1 alone also
    # the fp32 weight copies and the minus-one vectors
    T, outs = 64, 64 + 32
    assert traced == 2 * (2 * 4 * T * outs + 2 * 4 * outs) + 4 * (64 * 64 + 32 * 64) + 4 * outs


def test_dora_forward_transients_can_make_the_peak(write_scenario):
    """DoRA's weight norm builds an in x in identity, B A and W + s B A per adapted linear in forward (peft
    lora/dora.py): with a wide MLP and a small vocabulary (small logits) the forward is the peak. By hand for
    down_proj (in 800, out 256, r 16, bf16 base so W is copied to fp32, 128 tokens):
    4 x (800^2 + 800*16 + 800*256 + 800*256 + max(2*800*256, 3*128*256)). The estimate's forward moment against
    the trace (= the CPU runner)."""
    from peftprof.trace import trace_peak

    text = ('[model]\nmodel_type = "llama"\nhidden_size = 256\nnum_hidden_layers = 2\nnum_attention_heads = 8\n'
            'intermediate_size = 800\nvocab_size = 500\n[precision]\nweights = "bf16"\n[peft]\nr = 16\n'
            'target_modules = "all-linear"\nuse_dora = true\n[training]\nbatch_size = 1\nseq_len = 128\n')
    (s,) = load_scenario(write_scenario(text))
    down = next(sp for sp in s.model.arch.layer_linears if sp.path.endswith("down_proj"))
    assert pm.dora_forward_transient_bytes(s, down, 128) == 4 * (800 * 800 + 800 * 16 + 4 * 800 * 256)
    traced = trace_peak(s)
    analytic = estimate(s, device="cpu")
    assert traced["peak_phase"] == analytic["peak_phase"] == "forward"
    assert abs(analytic["peak_bytes"] / traced["peak_bytes"] - 1) < 0.001


def test_rslora_changes_no_memory(write_scenario):
    from peftprof.trace import trace_peak

    plain = scenario(write_scenario, 'method = "lora"\nr = 16\nalpha = 16')
    rs = scenario(write_scenario, 'method = "lora"\nr = 16\nalpha = 16\nuse_rslora = true')
    assert estimate(rs, device="cpu") | {"n_params": 0} == estimate(plain, device="cpu") | {"n_params": 0}
    a, b = trace_peak(plain), trace_peak(rs)
    assert a["peak_bytes"] == b["peak_bytes"] and a["breakdown"] == b["breakdown"]


def test_trace_and_analytic_answer_for_loha_lokr_vera_oft(write_scenario):
    from peftprof.trace import trace_estimate

    for method in ("loha", "lokr", "vera", "oft"):
        s = scenario(write_scenario, f'method = "{method}"\nr = 4')
        assert pm.analytic_gap(s) is None  # modelled since (estimate/adapter_saves.py, tests/test_adapter_saves.py)
        out = trace_estimate(s, device="cpu")
        assert out["n_trainable_params"] == sum(mem.trainable_tensors(s))
        assert out["breakdown"]["trainable"] == 4 * sum(mem.trainable_tensors(s))


@pytest.mark.parametrize(("peft", "precision", "message"), [
    ('method = "loha"\nuse_dora = true', 'weights = "fp32"',
     "[peft] use_dora: does not apply to method loha (applies to: lora)"),
    ('method = "lora"\nuse_dora = true', 'weights = "int8"', "[peft] use_dora: DoRA on bitsandbytes int8 weights"),
    ('method = "oft"\nr = 3', 'weights = "fp32"', "[peft] r: 3 OFT blocks must divide the input width"),
    ('method = "lora"\nmodules_to_save = ["head"]', 'weights = "fp32"',
     "[peft] modules_to_save: head is not a model-level module of llama"),
    ('method = "vera"', 'weights = "nf4"', "[peft] method: vera on nf4 weights cannot be estimated yet"),
    ('method = "loha"', 'weights = "nf4"', "[peft] method: loha on nf4 weights fails in peft 0.21.2"),
    ('method = "lora"\nnum_adapters = 2\nmodules_to_save = ["lm_head"]', 'weights = "fp32"',
     "[peft] num_adapters: several adapters with modules_to_save"),
    ('method = "lora"\nuse_dora = true', 'weights = "nf4"\nautocast = "bf16"\n[training]\ngradient_checkpointing = "full"',
     "[peft] use_dora: DoRA on nf4 with autocast cannot be estimated"),
    ('method = "lora"\ncombination = "cat"', 'weights = "fp32"',
     "[peft] combination: cat merges the K adapters of num_adapters; there is 1"),
    ('method = "lora"\nnum_adapters = 2\ncombination = "svd"\nuse_dora = true', 'weights = "fp32"',
     "[peft] combination: a DoRA merge is not what it says"),
    ('method = "lora"\nnum_adapters = 2\ncombination = "ties"', 'weights = "fp32"', "[peft] combination:"),
    ('method = "loha"\ncombination = "linear"', 'weights = "fp32"',
     "[peft] combination: does not apply to method loha"),
])
def test_loader_refuses_with_one_line(write_scenario, peft, precision, message):
    path = write_scenario(f"{ARCH}[precision]\n{precision}\n[peft]\n{peft}\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# peft add_weighted_adapter (tuners/lora/model.py) over K = 3 adapters of r = 4 on q_proj (64 -> 64) and v_proj
# (64 -> 32), 2 layers: one adapter is 2 x (4*64 + 64*4 + 4*64 + 32*4) = 1792 values; linear and svd train a
# rank-4 combined adapter (1792), cat a rank-12 one (3 x 1792 = 5376); the 3 originals stay resident (3 x 1792 fp32)
MERGE_HAND = {"linear": (1792, 3 * 1792 * 4), "cat": (5376, 3 * 1792 * 4),
              # svd: lora_A is a view of the in x in Vh: 2 layers x 2 linears x (64 - 4) x 64 fp32 beyond A's own
              "svd": (1792, 3 * 1792 * 4 + 2 * 2 * 60 * 64 * 4)}


@pytest.mark.parametrize("combo", sorted(MERGE_HAND))
def test_merge_counts_by_hand_and_against_peft(write_scenario, combo):
    from peftprof.run.build import build, tensor_bytes

    s = scenario(write_scenario, f'method = "lora"\nr = 4\nnum_adapters = 3\ncombination = "{combo}"\n'
                 'target_modules = ["q_proj", "v_proj"]')
    trained, frozen = MERGE_HAND[combo]
    assert sum(mem.trainable_tensors(s)) == trained and pm.frozen_adapter_bytes(s) == frozen
    model = build(s, "cpu").model
    assert model.active_adapters == ["combined"]
    params = dict(model.named_parameters())
    assert sorted(p.numel() for p in params.values() if p.requires_grad) == sorted(mem.trainable_tensors(s))
    assert all(".combined." in n for n, p in params.items() if p.requires_grad)
    resident = [p for n, p in params.items() if "lora_" in n and ".combined." not in n]
    combined = [p for n, p in params.items() if ".combined." in n]
    assert all(not p.requires_grad for p in resident)
    # the storages behind the adapters: the K originals, and what the combined one holds beyond its own values
    assert tensor_bytes(resident) + tensor_bytes(combined) - 4 * trained == frozen


def test_merge_against_the_runner(write_scenario):
    """linear and svd: the analytic peak within 0.1% of the CPU runner's (svd's retained Vh included); cat: the
    analytic estimator refuses and the trace equals the runner, with the combined adapter in the base dtype (bf16:
    peft creates it so and add_weighted_adapter does not upcast it); svd: the trace refuses."""
    from peftprof.errors import UserError
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    for combo, weights in (("linear", "fp32"), ("svd", "fp32"), ("cat", "bf16")):
        s = scenario(write_scenario, f'method = "lora"\nr = 4\nnum_adapters = 3\ncombination = "{combo}"\n'
                     'target_modules = "all-linear"', precision=f'weights = "{weights}"')
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", rec.get("error")
        measured = rec["measured"]
        if combo == "cat":
            traced = trace_peak(s)
            assert traced["peak_bytes"] == measured["peak_bytes"] and traced["breakdown"] == measured["breakdown"]
            assert measured["breakdown"]["trainable"] == 2 * sum(mem.trainable_tensors(s))  # bf16, rank 12
        assert pm.analytic_gap(s) is None
        analytic = estimate(s, device="cpu")
        assert abs(analytic["peak_bytes"] / measured["peak_bytes"] - 1) < 0.001
        b, m = analytic["breakdown"], measured["breakdown"]
        # (64 B: the base weights' known offset, the same without a merge)
        assert abs(b["weights"] + b["trainable"] - m["weights"] - m["trainable"]) <= 64
        if combo == "svd":
            with pytest.raises(UserError, match="svd merge"):
                trace_peak(s)
