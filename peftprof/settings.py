"""Resolved settings: frozen, keyword-only dataclasses. The raw TOML dict never gets past the loader."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

from .arch import Arch, LinearSpec, build_arch
from .families import family

WEIGHT_KINDS = ("fp32", "fp16", "bf16", "int8", "int4", "fp4", "nf4")
FLOAT_KINDS = ("fp32", "fp16", "bf16")
FOUR_BIT_KINDS = ("int4", "fp4", "nf4")
BNB_4BIT_KINDS = ("fp4", "nf4")  # bitsandbytes Linear4bit quant_type
COMPUTE_DTYPES = FLOAT_KINDS
AUTOCAST_KINDS = ("none", "bf16", "fp16")  # torch.autocast dtype of the forward and loss; "none": no autocast
METHODS = ("full", "lora", "ia3", "prompt_tuning", "prefix_tuning", "loha", "lokr", "vera", "oft", "xlora")
ADAPTER_METHODS = ("lora", "ia3", "loha", "lokr", "vera", "oft")  # methods that adapt target_modules' layers
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")  # [distributed] strategy
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")
ATTENTIONS = ("sdpa", "eager")
DEVICES = ("auto", "cpu", "cuda")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}

def matches_target(path: str, target: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists): exact name or a dotted suffix."""
    return path == target or path.endswith("." + target)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    preset: str | None = None
    config_file: str | None = None
    config: Mapping[str, object]  # resolved HF config fields, model_type included
    hub: str | None = None  # a Hugging Face model id whose config.json gave `config`
    revision: str | None = None  # its branch, tag or commit as given (None: the default branch)

    @functools.cached_property
    def arch(self) -> Arch:
        return build_arch(dict(self.config))


@dataclass(frozen=True, kw_only=True)
class PrecisionSettings:
    weights: str = "bf16"
    double_quant: bool = False
    compute_dtype: str = "bf16"
    quant_block_size: int = 64
    autocast: str = "none"

    @property
    def is_quantized(self) -> bool:
        return self.weights not in FLOAT_KINDS

    @property
    def is_4bit(self) -> bool:
        return self.weights in FOUR_BIT_KINDS


@dataclass(frozen=True, kw_only=True)
class PeftSettings:
    method: str = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None  # None -> peft's default for the model type
    num_virtual_tokens: int = 20
    use_dora: bool = False  # LoRA only: weight-decomposed LoRA (peft LoraConfig.use_dora)
    use_rslora: bool = False  # LoRA only: scaling alpha / sqrt(r) (peft LoraConfig.use_rslora)
    modules_to_save: tuple[str, ...] = ()  # modules trained in full beside the adapter (peft modules_to_save)
    target_parameters: tuple[str, ...] = ()  # LoRA on nn.Parameters, e.g. MoE expert stacks (peft target_parameters)
    num_adapters: int = 1  # adapters loaded on the base: one trained, the others resident
    combination: str = "none"  # LoRA, K >= 2: train peft add_weighted_adapter's merge of the K (linear|cat|svd)
    xlora_depth: int = 1  # X-LoRA: layers of the gating classifier (peft XLoraConfig.xlora_depth)
    xlora_size: int = 2048  # X-LoRA: hidden size of the classifier when xlora_depth > 1 (XLoraConfig.xlora_size)
    layerwise_scalings: bool = False  # X-LoRA: one gate per adapted linear (XLoraConfig.layerwise_scalings)

    def targets(self, arch: Arch) -> tuple[str, ...]:
        """Target names as peft receives them (all-linear expanded to leaf names, lm_head excluded)."""
        if self.target_modules == "all-linear":
            return arch.linear_names
        if self.target_modules is not None:
            return tuple(self.target_modules)
        f = family(arch.model_type)  # peft's per-model defaults (peft/utils/constants.py), kept by the registry
        default = f.ia3_targets if self.method == "ia3" else f.lora_targets
        if default is None:  # the loader refuses this: scenario.py asks for target_modules
            raise ValueError(f"peft has no default target_modules for {arch.model_type}")
        return default

    def feedforward_targets(self, arch: Arch) -> tuple[str, ...]:
        """IA3 modules scaled on their input (peft's feedforward_modules); the rest scale outputs."""
        ff = family(arch.model_type).ia3_feedforward or ()
        if self.target_modules is None:
            return ff
        return tuple(t for t in self.targets(arch) if any(matches_target(t, f) or matches_target(f, t) for f in ff))

    def targeted_linears(self, arch: Arch) -> tuple[LinearSpec, ...]:
        """The linear layers (per decoder layer and model-level) that get an adapter."""
        if self.method not in ADAPTER_METHODS:
            return ()
        names = self.targets(arch)
        return tuple(s for s in arch.layer_linears + arch.model_linears
                     if any(matches_target(s.path, t) for t in names))


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    batch_size: int = 1
    seq_len: int = 512
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    gradient_checkpointing: str = "none"
    attention: str = "sdpa"

    @property
    def checkpoint_every(self) -> int:
        """0: no checkpointing; k: every k-th decoder layer is checkpointed (1 = full)."""
        policy = self.gradient_checkpointing
        if policy == "none":
            return 0
        if policy == "full":
            return 1
        return int(policy.split("_", 1)[1])


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    device: str = "auto"
    steps: int = 5
    warmup_steps: int = 1
    seed: int = 0
    cuda_alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF of CUDA runs and of the simulated allocator ("": torch's defaults)


@dataclass(frozen=True, kw_only=True)
class DistributedSettings:
    """[distributed]: data-parallel training over `world_size` ranks; estimates and measurements are per rank."""

    world_size: int = 1
    strategy: str = "ddp"  # one of STRATEGIES
    cpu_offload: bool = False  # parameters and/or optimizer state on the host, as the strategy offers it


@dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """[inference]: forward-only serving instead of a training step (no optimizer, no gradients)."""

    enabled: bool = False
    merged: bool = False  # adapters merged into the base weights (peft merge_and_unload) before serving
    max_new_tokens: int = 0  # 0: one forward pass over the prompt; > 0: generation with a KV cache
    max_memory: str = ""  # accelerate's max_memory for the device ("" = all on the device), e.g. "2GiB"


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One fully resolved variant: everything the estimator and runner need."""

    name: str  # the variant name, e.g. qlora-7b[peft.r=8]
    scenario: str  # the scenario's name (shared by its variants)
    description: str = ""
    source: str = ""
    model: ModelSettings
    precision: PrecisionSettings = PrecisionSettings()
    peft: PeftSettings = PeftSettings()
    training: TrainingSettings = TrainingSettings()
    run: RunSettings = RunSettings()
    distributed: DistributedSettings = DistributedSettings()
    inference: InferenceSettings = InferenceSettings()
    overrides: tuple[tuple[str, object], ...] = ()  # this variant's sweep values
    not_applicable: tuple[str, ...] = field(default=())  # keys set but not applying to this variant

    def to_dict(self) -> dict:
        """JSON-ready resolved settings (the `scenario` field of every result)."""
        out = {
            "name": self.name, "scenario": self.scenario, "description": self.description, "source": self.source,
            "model": {"preset": self.model.preset, "config_file": self.model.config_file,
                      "config": dict(self.model.config),
                      **{k: v for k in ("hub", "revision") if (v := getattr(self.model, k)) is not None}},
            "precision": asdict(self.precision), "peft": asdict(self.peft), "training": asdict(self.training),
            "run": asdict(self.run), "distributed": asdict(self.distributed),
            "inference": asdict(self.inference), "overrides": {k: v for k, v in self.overrides},
            "not_applicable": list(self.not_applicable),
        }
        if isinstance(self.peft.target_modules, tuple):
            out["peft"]["target_modules"] = list(self.peft.target_modules)
        for key in ("modules_to_save", "target_parameters"):
            out["peft"][key] = list(out["peft"][key])
        return out

    def settings_key(self) -> str:
        """Stable identity of what is measured (used to skip variants already measured)."""
        import hashlib
        import json

        d = self.to_dict()
        for k in ("description", "source", "not_applicable"):
            d.pop(k)
        if d["precision"]["autocast"] == "none":  # the default: keys of results measured before the setting existed
            d["precision"].pop("autocast")
        if not d["run"]["cuda_alloc_conf"]:  # the default, likewise
            d["run"].pop("cuda_alloc_conf")
        # settings added later, dropped at their defaults so that earlier results keep their keys
        for section, defaults in (("peft", PeftSettings()), ("distributed", DistributedSettings()),
                                  ("inference", InferenceSettings())):
            for key in LATER_KEYS[section]:
                value = getattr(defaults, key)
                if d[section][key] == (list(value) if isinstance(value, tuple) else value):
                    d[section].pop(key)
            if not d[section]:
                d.pop(section)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


LATER_KEYS = {"peft": ("use_dora", "use_rslora", "modules_to_save", "target_parameters", "num_adapters",
                       "combination", "xlora_depth", "xlora_size", "layerwise_scalings"),
              "distributed": ("world_size", "strategy", "cpu_offload"),
              "inference": ("enabled", "merged", "max_new_tokens", "max_memory")}


def frozen_mapping(d: dict) -> Mapping[str, object]:
    return MappingProxyType(dict(d))
