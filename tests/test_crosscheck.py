"""Issue #12: an independent check of the CPU measurement.

The trace estimator and the runner share one tracker (peftprof/run/track.py), so their exact agreement
(tests/test_runner.py) checks the fake-tensor stand-ins, not the measurement. Here the runner's measured
peak and categories are compared with torch's own MemTracker (tests/memtracker_reference.py: no code from
peftprof/run/track.py or probe.py), one steady training step (optimizer state present) per scenario.

Tolerance (issue #12, not loosened): the peak within 2% of the runner's; each category group (mapping in
memtracker_reference.py: static / grads / optim / dynamic) within 2% of the runner's peak (a group can be a
few bytes, e.g. LoRA gradients, so a share of the group itself would be meaningless).

Measured at writing (torch 2.13.0+cpu, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2): 12 of the 14
scenarios equal to the byte in the peak and in every group (the optimizer-peak one included, after moving
1,536,768 B of AdamW step temporaries from OPT to "dynamic"). Prompt tuning +64 B and prefix tuning +48 B
(0.003%, "dynamic"): peft's `prompt_tokens`, an int64 attribute tensor (neither parameter nor buffer) that
exists before the step; MemTracker adds it when an op first views it (it tracks the outputs of every op,
views included, mem_tracker.py `_track`), the runner registers parameters, buffers, quantization constants
and optimizer state only (peftprof/run/step.py `registered_tensors`). The input ids, which gpt2 and opt view,
are ignored by the reference because the runner does not count the batch.

The issue #12 lead (MemTracker 1,478,400 B above the runner on a checkpointed fp32 llama LoRA step) is a
MemTracker artifact, not a missed allocation: see `test_stock_memtracker_leaks_the_checkpoint_input_leaf`
and CycleFreeModTracker in memtracker_reference.py. The same scenario is `lead-llama-gqa-lora-ckpt` below
and agrees to the byte once that artifact is removed.

Issue #13 added four mixed-precision scenarios (`amp-*`: fp16 autocast with torch.amp.GradScaler on fp32 full
fine-tuning, bf16 autocast on bf16 LoRA with every_2/eager, the QLoRA recipe, bf16 autocast on fp32 gpt2 IA3):
measured at writing, all four equal to the byte in the peak and in every group.
"""

import gc

import pytest
import torch
from memtracker_reference import GROUPS, FrozenSafeMemTracker, _NoProbe, measure, peftprof_groups

from peftprof.run.build import build
from peftprof.run.runner import run_variant
from peftprof.run.step import synthetic_batch, train_step
from peftprof.run.track import MemoryTracker
from peftprof.scenario import load_scenarios

TOLERANCE = 0.02  # issue #12: 2% of the runner's peak, for the peak and for each category group

LLAMA = '''model_type = "llama"
hidden_size = {h}
num_hidden_layers = {layers}
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = {inter}
vocab_size = 1000'''

# name -> (model, precision, peft, training); every scenario: one timed step, then the tracked one (steady:
# optimizer state exists), which the reference repeats on a fresh build.
SCENARIOS = {
    # the issue #12 lead's shape, scaled down (hidden 384 -> 192, vocab 6000 -> 3000, 3x160 -> 2x48 tokens) to
    # keep this file fast: fp32 llama GQA 6/2, LoRA all-linear r=12, full non-reentrant checkpointing, AdamW
    "lead-llama-gqa-lora-ckpt": (
        'model_type = "llama"\nhidden_size = 192\nnum_hidden_layers = 3\nnum_attention_heads = 6\n'
        'num_key_value_heads = 2\nintermediate_size = 512\nvocab_size = 3000',
        'weights = "fp32"', 'method = "lora"\nr = 12\ntarget_modules = "all-linear"',
        'batch_size = 2\nseq_len = 48\noptimizer = "adamw"\ngradient_checkpointing = "full"'),
    "full-fp32-adamw-eager": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "fp32"', 'method = "full"',
        'batch_size = 2\nseq_len = 32\nattention = "eager"'),
    "full-fp32-adamw-optimizer-peak": (  # large weights, few tokens: the peak is in the optimizer step
        LLAMA.format(h=192, layers=2, inter=512), 'weights = "fp32"', 'method = "full"',
        'batch_size = 1\nseq_len = 16'),
    "full-bf16-sgd-every2": (
        LLAMA.format(h=64, layers=3, inter=160), 'weights = "bf16"', 'method = "full"',
        'batch_size = 2\nseq_len = 24\noptimizer = "sgd"\ngradient_checkpointing = "every_2"'),
    "full-fp32-adamw8bit-ckpt": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "fp32"', 'method = "full"',
        'batch_size = 2\nseq_len = 32\noptimizer = "adamw_8bit"\ngradient_checkpointing = "full"'),
    "lora-bf16-dropout-adamw8bit-eager": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "bf16"', 'method = "lora"\nr = 8\ndropout = 0.1',
        'batch_size = 2\nseq_len = 32\noptimizer = "adamw_8bit"\nattention = "eager"'),
    "qlora-nf4-dq-bf16-ckpt": (
        LLAMA.format(h=64, layers=2, inter=160),
        'weights = "nf4"\ndouble_quant = true\ncompute_dtype = "bf16"',
        'method = "lora"\nr = 8\ntarget_modules = "all-linear"',
        'batch_size = 2\nseq_len = 32\ngradient_checkpointing = "full"'),
    "lora-int8-fp32-every2-sgd": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "int8"\ncompute_dtype = "fp32"', 'method = "lora"\nr = 4',
        'batch_size = 2\nseq_len = 24\noptimizer = "sgd"\ngradient_checkpointing = "every_2"'),
    "ia3-fp32-ckpt-eager": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "fp32"', 'method = "ia3"',
        'batch_size = 2\nseq_len = 32\ngradient_checkpointing = "full"\nattention = "eager"'),
    "ia3-nf4-fp32-mistral-adamw8bit": (
        'model_type = "mistral"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
        'num_key_value_heads = 1\nintermediate_size = 160\nvocab_size = 1200',
        'weights = "nf4"\ncompute_dtype = "fp32"', 'method = "ia3"',
        'batch_size = 2\nseq_len = 24\noptimizer = "adamw_8bit"'),
    "prompt-fp32-qwen2-ckpt": (
        'model_type = "qwen2"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
        'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 1500',
        'weights = "fp32"', 'method = "prompt_tuning"\nnum_virtual_tokens = 8',
        'batch_size = 2\nseq_len = 24\ngradient_checkpointing = "full"'),
    "prefix-bf16-eager": (
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "bf16"', 'method = "prefix_tuning"\nnum_virtual_tokens = 6',
        'batch_size = 3\nseq_len = 24\nattention = "eager"'),
    "lora-fp32-gpt2-ckpt": (
        'model_type = "gpt2"\nn_embd = 64\nn_layer = 2\nn_head = 4\nvocab_size = 1100\nn_positions = 256\n'
        '',
        'weights = "fp32"', 'method = "lora"\nr = 4', 'batch_size = 2\nseq_len = 24\ngradient_checkpointing = "full"'),
    "lora-fp32-opt-every2": (
        'model_type = "opt"\nhidden_size = 64\nnum_hidden_layers = 2\nffn_dim = 256\nnum_attention_heads = 4\n'
        'vocab_size = 900\nmax_position_embeddings = 256',
        'weights = "fp32"', 'method = "lora"\nr = 4\ntarget_modules = "all-linear"',
        'batch_size = 2\nseq_len = 16\ngradient_checkpointing = "every_2"'),
    # issue #13, mixed precision: the forward and loss under torch.autocast, backward outside it
    "amp-full-fp32-fp16-gradscaler": (  # the classic AMP setup: fp32 weights, fp16 autocast, loss scaling
        LLAMA.format(h=64, layers=2, inter=160), 'weights = "fp32"\nautocast = "fp16"', 'method = "full"',
        'batch_size = 2\nseq_len = 32'),
    "amp-lora-bf16-bf16-every2-eager": (
        LLAMA.format(h=64, layers=3, inter=160), 'weights = "bf16"\nautocast = "bf16"',
        'method = "lora"\nr = 8\ndropout = 0.1\ntarget_modules = "all-linear"',
        'batch_size = 2\nseq_len = 24\ngradient_checkpointing = "every_2"\nattention = "eager"'),
    "amp-qlora-recipe": (  # NF4 + double quant + bf16 compute + autocast + checkpointing + paged 8-bit AdamW
        LLAMA.format(h=128, layers=2, inter=320),
        'weights = "nf4"\ndouble_quant = true\ncompute_dtype = "bf16"\nautocast = "bf16"',
        'method = "lora"\nr = 8\ntarget_modules = "all-linear"',
        'batch_size = 2\nseq_len = 32\ngradient_checkpointing = "full"\noptimizer = "paged_adamw_8bit"'),
    "amp-ia3-fp32-bf16-gpt2-sgd": (
        'model_type = "gpt2"\nn_embd = 64\nn_layer = 2\nn_head = 4\nvocab_size = 1100\nn_positions = 256',
        'weights = "fp32"\nautocast = "bf16"', 'method = "ia3"', 'batch_size = 2\nseq_len = 24\noptimizer = "sgd"'),
}


def _toml(name: str, model: str, precision: str, peft: str, training: str) -> str:
    return (f'name = "{name}"\n[model]\n{model}\n[precision]\n{precision}\n[peft]\n{peft}\n[training]\n{training}\n'
            '[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 0\n')


def _load(tmp_path, name: str, parts) -> object:
    path = tmp_path / f"{name}.toml"
    path.write_text(_toml(name, *parts))
    (s,) = load_scenarios([path])
    return s


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """name -> (scenario, runner's measured record, MemTracker reference), each measured once."""
    tmp = tmp_path_factory.mktemp("crosscheck")
    out = {}
    for name, parts in SCENARIOS.items():
        s = _load(tmp, name, parts)
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", (name, rec["error"])
        out[name] = (s, rec["measured"], measure(s))
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_runner_peak_and_categories_match_torch_memtracker(compared, name):
    s, measured, ref = compared[name]
    peak = measured["peak_bytes"]
    assert abs(ref.peak_bytes - peak) <= TOLERANCE * peak, (name, ref.peak_bytes, peak)
    ours = peftprof_groups(measured["breakdown"])
    assert sum(ours.values()) == peak  # the groups partition the runner's peak (overhead is 0 on CPU)
    assert sum(ref.groups.values()) == ref.peak_bytes
    for group in GROUPS:
        assert abs(ref.groups[group] - ours[group]) <= TOLERANCE * peak, (name, group, ref.groups, ours)


def test_scenarios_cover_methods_precisions_policies_optimizers_and_attention(compared):
    seen = {"method": set(), "weights": set(), "policy": set(), "optimizer": set(), "attention": set(), "phase": set()}
    for s, measured, _ in compared.values():
        seen["method"].add(s.peft.method)
        seen["weights"].add(s.precision.weights)
        seen["policy"].add(s.training.gradient_checkpointing)
        seen["optimizer"].add(s.training.optimizer)
        seen["attention"].add(s.training.attention)
        seen["phase"].add(measured["peak_phase"])
    assert seen["method"] == {"full", "lora", "ia3", "prompt_tuning", "prefix_tuning"}
    assert {"fp32", "bf16", "nf4", "int8"} <= seen["weights"]
    assert seen["policy"] == {"none", "full", "every_2"}
    assert {"adamw", "adamw_8bit", "sgd"} <= seen["optimizer"]
    assert seen["attention"] == {"sdpa", "eager"}
    assert {"backward", "optimizer"} <= seen["phase"]  # the groups are checked at peaks of both kinds


def test_autocast_scenarios_cover_both_dtypes_methods_and_loss_scaling(compared):
    """Issue #13: at least 3 autocast scenarios, bf16 and fp16 (the latter with torch.amp.GradScaler)."""
    amp = [s for s, _, _ in compared.values() if s.precision.autocast != "none"]
    assert len(amp) >= 3
    assert {s.precision.autocast for s in amp} == {"bf16", "fp16"}
    assert {"full", "lora", "ia3"} <= {s.peft.method for s in amp}
    assert {"fp32", "bf16", "nf4"} <= {s.precision.weights for s in amp}


def _live_tensors_shaped(shape) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and tuple(o.shape) == shape)


def test_stock_memtracker_leaks_the_checkpoint_input_leaf(tmp_path):
    """The issue #12 lead, explained. With checkpointing, transformers' enable_input_require_grads makes the
    embedding output a leaf that requires grad. Stock ModTracker puts a multi-grad hook (mode "all") on every
    module input that requires grad and drops the handle; the hook's closure holds the inputs' autograd
    nodes and each node holds the hook: an uncollectable cycle through C++, and the nodes' edges reach the
    leaf's AccumulateGrad, which owns the leaf. So under stock MemTracker the leaf and its .grad (2 x batch
    x seq x hidden fp32 values) survive the step; MemTracker's books carry them through the optimizer step
    and into the next step, whose peak is then exactly that much above the runner's. The lead measured a
    later step (reset_mod_stats() between steps): 1,474,560 B = 2 x 3 x 160 x 384 x 4 of its 1,478,400 B;
    the other 3,840 B = 3 x 160 x 8, an int64 (batch, seq) tensor, is not reproduced by peftprof's step
    (input_ids and labels only) and matches an attention mask that its plain script passed (not verified).
    Without a tracker no such tensor outlives the step, so the runner is right; CycleFreeModTracker removes
    the hooks at the end of backward and agrees with the runner to the byte, step after step."""
    batch, seq, hidden = 2, 20, 64  # a shape no other test of this file makes
    s = _load(tmp_path, "leak", (LLAMA.format(h=hidden, layers=2, inter=160), 'weights = "fp32"',
                                 'method = "lora"\nr = 4\ntarget_modules = "all-linear"',
                                 f'batch_size = {batch}\nseq_len = {seq}\ngradient_checkpointing = "full"'))
    measured = run_variant(s, device="cpu")["measured"]["peak_bytes"]
    shape, leaked = (batch, seq, hidden), 2 * batch * seq * hidden * 4
    peaks = {}
    for cycle_free in (False, True):
        built = build(s, "cpu")
        ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(s.run.seed))
        built.model.train()
        before = _live_tensors_shaped(shape)  # the stock tracker's leftovers stay for good
        train_step(built, s, ids, _NoProbe(), {})  # optimizer state exists from here on
        assert _live_tensors_shaped(shape) == before  # no tracker: nothing of the step survives it
        mt = FrozenSafeMemTracker(cycle_free=cycle_free)
        mt.track_external(built.model, built.optimizer)
        with mt:
            train_step(built, s, ids, _NoProbe(), {})
            first = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
            survivors = _live_tensors_shaped(shape) - before
            mt.reset_mod_stats()
            train_step(built, s, ids, _NoProbe(), {})
            second = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        peaks[cycle_free] = (first, survivors, second)
        del built, mt
        gc.collect()
    assert peaks[False] == (measured, 2, measured + leaked)  # the leaf and its .grad: the lead's excess
    assert peaks[True] == (measured, 0, measured)


def test_tracker_counts_storages_made_by_the_tensor_constructor():
    """torch.tensor(data) allocates below the dispatcher and announces the new tensor through aten::lift_fresh,
    whose schema says "alias of the input"; the tracker skipped it until the MemTracker cross-check showed a
    tensor MemTracker saw and it did not (peft prefix tuning builds one, empty, every step). Reference: the
    storages' own sizes (4000 B each: 1000 fp32 values)."""
    tracker = MemoryTracker()
    tracker.phase = "forward"
    with tracker:
        made = torch.tensor([float(i) for i in range(1000)])
        zeros = torch.zeros(1000)
    assert tracker.live_bytes == made.untyped_storage().nbytes() + zeros.untyped_storage().nbytes() == 8000
