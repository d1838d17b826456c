"""Vision models' shapes: a transformers image-classification config -> `VisionArch` (no torch import).

ViT follows transformers/models/vit/modeling_vit.py (transformers 5: q/k/v/o_proj, fc1/fc2), ResNet
transformers/models/resnet/modeling_resnet.py. Module paths are absolute inside the transformers model
(`vit.layers.0.attention.q_proj`, `resnet.encoder.stages.0.layers.0.layer.0.convolution`), the names peft's
target_modules match by dotted suffix. tests/test_vision.py builds each with transformers and compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: peftprof.families registers this package's families at its import
    from ..families.base import LinearSpec


@dataclass(frozen=True, kw_only=True)
class ConvSpec:
    """One nn.Conv2d and the feature maps it sees at the scenario's image size (square images)."""

    path: str
    in_channels: int
    out_channels: int
    kernel: int  # square kernel, kh = kw
    stride: int
    padding: int
    groups: int
    bias: bool
    in_size: int  # input height = width
    out_size: int  # output height = width

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    # what code written for LinearSpec reads: a conv's channels play the features' part
    in_features = property(lambda self: self.in_channels)
    out_features = property(lambda self: self.out_channels)

    @property
    def n_weight_params(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel * self.kernel

    @property
    def n_params(self) -> int:
        return self.n_weight_params + (self.out_channels if self.bias else 0)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """torch.nn.Conv2d / MaxPool2d output size (dilation 1): floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True, kw_only=True)
class VisionArch:
    """The tensor shapes of an image classifier. Besides its own fields it answers the few questions the
    decoder-only pipeline asks every model (model_type, n_layers, n_params, the names target_modules may use)."""

    model_type: str
    image_size: int
    num_channels: int
    num_labels: int
    hidden_size: int  # ViT width; ResNet: channels of the last stage
    n_layers: int  # ViT encoder layers; ResNet residual blocks (sum of depths)
    linears: tuple[LinearSpec, ...]  # every nn.Linear, classifier included
    convs: tuple[ConvSpec, ...]  # every nn.Conv2d
    other_params: int  # parameters outside linears and convs (norms, cls token, position embeddings)
    # ViT
    n_heads: int = 0
    intermediate_size: int = 0
    n_tokens: int = 0  # patches + the CLS token
    hidden_act: str = "gelu"
    # ResNet: BatchNorm channel counts (each holds weight, bias and fp32 running_mean/var + int64 counter)
    batchnorm_channels: tuple[int, ...] = ()

    # the decoder-only pipeline's questions, answered for an image classifier
    vocab_size = property(lambda self: self.num_labels)  # the probe tags (batch, num_labels) outputs as logits
    logits_ndim = 2  # and only those: a feature map whose last dim equals num_labels is not (run/track.py)
    # seq_len does not apply (the loader refuses it and sets 1: one sample); no bound on it from here
    max_positions = 10_000_000
    n_experts = 0
    experts_per_token = 0
    tied_embeddings = False

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def layer_linears(self) -> tuple:
        return ()

    @property
    def model_linears(self) -> tuple:
        """Every module peft's LoRA can adapt here (Linear and Conv2d), by absolute path: the loader checks
        target_modules against these."""
        return self.linears + self.convs

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The names target_modules can use: leaf names, or the last two parts where the leaf is an index
        (ResNet's classifier.1: "1" would also name the ResNetConvLayer layer.1, which peft cannot adapt)."""
        seen: dict[str, None] = {}
        for spec in self.linears + self.convs:
            seen[spec.name if not spec.name.isdigit() else ".".join(spec.path.split(".")[-2:])] = None
        return tuple(seen)

    @property
    def n_params(self) -> int:
        return (sum(s.n_weight_params + (s.out_features if s.bias else 0) for s in self.linears)
                + sum(c.n_params for c in self.convs) + self.other_params)

    @property
    def n_active_params(self) -> int:
        return self.n_params


def vit(cfg: dict) -> VisionArch:
    """ViTForImageClassification: patch Conv2d (C -> H, kernel = stride = patch), CLS token and learned
    positions, `num_hidden_layers` pre-norm encoder layers, final LayerNorm, classifier on the CLS token."""
    from ..families.base import LinearSpec

    h, size, patch, ch = cfg["hidden_size"], cfg["image_size"], cfg["patch_size"], cfg["num_channels"]
    heads, inter, n_layers = cfg["num_attention_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    if h % heads:
        raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {heads}")
    if size % patch:
        raise ValueError(f"image_size {size} is not divisible by patch_size {patch}")
    grid = size // patch
    qkv_bias = cfg.get("qkv_bias", True)
    linears = []
    for i in range(n_layers):
        p = f"vit.layers.{i}."
        linears += [LinearSpec(path=p + f"attention.{n}", in_features=h, out_features=h, bias=qkv_bias)
                    for n in ("q_proj", "k_proj", "v_proj")]
        linears += [LinearSpec(path=p + "attention.o_proj", in_features=h, out_features=h, bias=True),
                    LinearSpec(path=p + "mlp.fc1", in_features=h, out_features=inter, bias=True),
                    LinearSpec(path=p + "mlp.fc2", in_features=inter, out_features=h, bias=True)]
    linears.append(LinearSpec(path="classifier", in_features=h, out_features=cfg["num_labels"], bias=True))
    conv = ConvSpec(path="vit.embeddings.patch_embeddings.projection", in_channels=ch, out_channels=h, kernel=patch,
                    stride=patch, padding=0, groups=1, bias=True, in_size=size, out_size=grid)
    n_tokens = grid * grid + 1
    # cls token, position embeddings, 2 LayerNorms (weight + bias) per layer, the final LayerNorm
    other = h + n_tokens * h + n_layers * 2 * 2 * h + 2 * h
    return VisionArch(model_type="vit", image_size=size, num_channels=ch, num_labels=cfg["num_labels"],
                      hidden_size=h, n_layers=n_layers, linears=tuple(linears), convs=(conv,), other_params=other,
                      n_heads=heads, intermediate_size=inter, n_tokens=n_tokens, hidden_act=cfg.get("hidden_act", "gelu"))


def resnet(cfg: dict) -> VisionArch:
    """ResNetForImageClassification: stem (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool), stages of basic or
    bottleneck blocks (a 1x1 shortcut conv + BatchNorm where channels or stride change), average pool, and
    `classifier.1` (a Linear inside nn.Sequential(Flatten, Linear))."""
    from ..families.base import LinearSpec

    sizes, depths = list(cfg["hidden_sizes"]), list(cfg["depths"])
    if len(sizes) != len(depths):
        raise ValueError(f"hidden_sizes has {len(sizes)} stages but depths {len(depths)}")
    if cfg["layer_type"] not in ("basic", "bottleneck"):
        raise ValueError(f"layer_type {cfg['layer_type']!r} is not a ResNet layer type (allowed: basic, bottleneck)")
    bottleneck = cfg["layer_type"] == "bottleneck"
    if bottleneck and any(s % 4 for s in sizes):
        raise ValueError(f"bottleneck layers divide hidden_sizes by 4 (reduction): {sizes}")
    ch, emb, size = cfg["num_channels"], cfg["embedding_size"], cfg["image_size"]
    convs, bns = [], []

    def conv(path, cin, cout, k, stride, in_size):
        out = conv_out_size(in_size, k, stride, k // 2)
        convs.append(ConvSpec(path=path, in_channels=cin, out_channels=cout, kernel=k, stride=stride, padding=k // 2,
                              groups=1, bias=False, in_size=in_size, out_size=out))
        bns.append(cout)
        return out

    s = conv("resnet.embedder.embedder.convolution", ch, emb, 7, 2, size)
    s = conv_out_size(s, 3, 2, 1)  # max pool
    cin = emb
    for i, (cout, depth) in enumerate(zip(sizes, depths, strict=True)):
        for j in range(depth):
            stride = (2 if i > 0 or cfg.get("downsample_in_first_stage", False) else 1) if j == 0 else 1
            p = f"resnet.encoder.stages.{i}.layers.{j}."
            if cin != cout or stride != 1:
                conv(p + "shortcut.convolution", cin, cout, 1, stride, s)  # shortcut: kernel 1, no padding
            if bottleneck:
                red, first = cout // 4, cfg.get("downsample_in_bottleneck", False)
                t = conv(p + "layer.0.convolution", cin, red, 1, stride if first else 1, s)
                t = conv(p + "layer.1.convolution", red, red, 3, 1 if first else stride, t)
                s = conv(p + "layer.2.convolution", red, cout, 1, 1, t)
            else:
                t = conv(p + "layer.0.convolution", cin, cout, 3, stride, s)
                s = conv(p + "layer.1.convolution", cout, cout, 3, 1, t)
            cin = cout
    classifier = LinearSpec(path="classifier.1", in_features=sizes[-1], out_features=cfg["num_labels"], bias=True)
    return VisionArch(model_type="resnet", image_size=size, num_channels=ch, num_labels=cfg["num_labels"],
                      hidden_size=sizes[-1], n_layers=sum(depths), linears=(classifier,), convs=tuple(convs),
                      other_params=sum(2 * c for c in bns), batchnorm_channels=tuple(bns),
                      hidden_act=cfg.get("hidden_act", "relu"))
