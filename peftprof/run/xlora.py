"""X-LoRA (peft XLoraModel, https://huggingface.co/papers/2402.07148): K frozen LoRA experts on the same target
modules and a trained classifier that gates them per token. Built for the runner and the trace alike.

peft 0.21.2 builds X-LoRA only from K adapters saved on disk (tuners/xlora/model.py XLoraModel.__init__ ->
_load_adapter_into_lora_model: LoraConfig.from_pretrained(path), inject_adapter, then load_peft_weights(path)).
Each expert here is a directory holding the LoraConfig and an empty weights file: peft injects the expert from
the config (init_lora_weights=False: A and B random, so every expert changes the output) and loads no tensor,
which works on a real device and on the meta device of the trace alike (nothing to copy). The experts must be
named "0", "1", ...: XLoraModel loads expert i as adapter str(i) but activates the names of `adapters`
(set_adapter(list(adapters.keys()))), so any other names fail in _pre_forward with a KeyError.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from ..settings import Scenario


def expert_lora_config(s: Scenario, task):
    """One expert: a LoRA of rank r on target_modules (peft LoraConfig), random A and B."""
    import peft

    m = s.peft
    targets = "all-linear" if m.target_modules == "all-linear" else list(m.targets(s.model.arch))
    return peft.LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=targets,
                           use_rslora=m.use_rslora, task_type=task, init_lora_weights=False)


PREFIX = "peftprof-xlora-"


def remove_stale_directories(tmp: str | None = None) -> list[str]:
    """Remove the expert directories of processes that no longer exist (named PREFIX<pid>-...): a run killed
    while peft built X-LoRA (the runner SIGKILLs an isolated variant past its limit) had no chance to. Returns
    the paths removed."""
    import shutil

    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not name.startswith(PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # (PermissionError: alive, another user's)
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(os.path.join(tmp, name))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def expert_directories(s: Scenario, task):
    """K adapter directories "0" .. "K-1" (adapter_config.json and an empty adapter_model.safetensors), removed
    on exit: peft reads them only while XLoraModel is built."""
    from safetensors.torch import save_file

    remove_stale_directories()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-") as root:
        paths = {}
        for i in range(s.peft.num_adapters):
            path = os.path.join(root, str(i))
            expert_lora_config(s, task).save_pretrained(path)
            save_file({}, os.path.join(path, "adapter_model.safetensors"))
            paths[str(i)] = path
        yield paths


def xlora_config(s: Scenario, adapters: dict[str, str], task):
    """peft XLoraConfig of the variant: the K experts, the classifier's depth, width and per-layer gates; everything
    else at peft's defaults (softmax on, dropout 0.2 between classifier layers, dense gating, experts frozen). Its
    `hidden_size` is the width of the last hidden state, which the classifier reads (classifier.py forward:
    `result.hidden_states[-1]`): the model's hidden size, but OPT's word_embed_proj_dim where OPT projects its
    output down (modeling_opt.py project_out; measured: hidden_size there fails with a shape error)."""
    import peft

    m = s.peft
    return peft.XLoraConfig(task_type=task, hidden_size=s.model.arch.embed_dim, adapters=adapters,
                            xlora_depth=m.xlora_depth, xlora_size=m.xlora_size,
                            layerwise_scalings=m.layerwise_scalings)


def wrap_xlora(model, s: Scenario):
    """peft.get_peft_model with the variant's XLoraConfig. XLoraModel leaves the model in eval mode (its
    __init__ ends with self.eval()); the runner and the trace switch to train mode before the steps."""
    import warnings

    import peft

    task = peft.TaskType.CAUSAL_LM
    with expert_directories(s, task) as adapters, warnings.catch_warnings():
        # peft warns that the empty weight files hold none of the experts' keys: the experts keep their random init
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, xlora_config(s, adapters, task))


def classifier_params(hidden: int, n_experts: int, n_adapted: int, depth: int, size: int, layerwise: bool) -> int:
    """Trainable values of the X-LoRA classifier (peft tuners/xlora/classifier.py XLoraClassifier.__init__):
    depth 1 is one Linear(hidden -> K, or K x n_adapted with layerwise gates) with bias; depth d > 1 is
    Linear(hidden -> size), d - 2 Linear(size -> size), then Linear(size -> K or K x n_adapted), all with bias.
    `n_adapted` counts the adapted linear modules (peft's n_layers: the swapped LoRA layers, not decoder layers)."""
    out = n_experts * (n_adapted if layerwise else 1)
    if depth == 1:
        return (hidden + 1) * out
    return (hidden + 1) * size + (depth - 2) * (size + 1) * size + (size + 1) * out


def expert_params(s: Scenario) -> int:
    """Frozen values of the K experts: r x (in + out) per targeted linear, K times (peft LoRA A and B)."""
    from ..settings import matches_target

    a = s.model.arch
    names = s.peft.targets(a)
    specs = [sp for sp in a.layer_linears + a.model_linears if any(matches_target(sp.path, t) for t in names)]
    per_layer = sum(sp.in_features + sp.out_features for sp in specs if sp in a.layer_linears)
    per_model = sum(sp.in_features + sp.out_features for sp in specs if sp in a.model_linears)
    return s.peft.num_adapters * s.peft.r * (per_layer * a.n_layers + per_model)
