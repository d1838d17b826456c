"""Registry entries of the vision families (image classification): config keys are transformers' config keys,
defaults those of its config classes (ViTConfig, ResNetConfig; transformers' PretrainedConfig num_labels = 2).
`image_size` and `num_channels` are the scenario's image keys: the synthetic batch is (batch_size, num_channels,
image_size, image_size). ResNetConfig has no image_size (any size runs): it is passed on and unused there."""

from __future__ import annotations

# what a published config carries that changes no tensor size (or that peftprof does not set)
IGNORED = ("torch_dtype", "dtype", "encoder_stride", "pooler_output_size", "pooler_act", "hidden_dropout_prob",
           "attention_probs_dropout_prob", "initializer_range", "id2label", "label2id", "out_features",
           "out_indices", "stage_names")


def families() -> tuple:
    """The Family entries (built on call: peftprof/families/__init__.py registers them once its base module is
    loaded, so neither package needs the other at import)."""
    from ..families.base import Family
    from . import arch

    vit = Family(
        name="vit",
        keys={
            "hidden_size": ("int", 768),
            "num_hidden_layers": ("int", 12),
            "num_attention_heads": ("int", 12),
            "intermediate_size": ("int", 3072),
            "hidden_act": ("str", "gelu"),
            "layer_norm_eps": ("float", 1e-12),
            "image_size": ("int", 224),
            "patch_size": ("int", 16),
            "num_channels": ("int", 3),
            "qkv_bias": ("bool", True),
            "num_labels": ("int", 2),
        },
        required=(),
        build=arch.vit,
        lora_targets=None,  # peft/utils/constants.py has no LoRA default for vit: target_modules must be given
        ia3_targets=None,
        ia3_feedforward=None,
        notes="image classification (ViTForImageClassification)",
        ignored=IGNORED,
    )

    resnet = Family(
        name="resnet",
        keys={
            "num_channels": ("int", 3),
            "embedding_size": ("int", 64),
            "hidden_sizes": ("ints", (256, 512, 1024, 2048)),
            "depths": ("ints", (3, 4, 6, 3)),
            "layer_type": ("str", "bottleneck"),
            "hidden_act": ("str", "relu"),
            "downsample_in_first_stage": ("bool", False),
            "downsample_in_bottleneck": ("bool", False),
            "image_size": ("int", 224),
            "num_labels": ("int", 2),
        },
        required=(),
        build=arch.resnet,
        lora_targets=None,
        ia3_targets=None,
        ia3_feedforward=None,
        sdpa=True,  # no attention at all: the loader marks [training] attention not applicable
        notes="image classification (ResNetForImageClassification)",
        ignored=IGNORED,
    )
    return vit, resnet
