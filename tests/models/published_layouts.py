"""The state-dict layouts of the published weight files: every tensor's name and shape.

Written out from the reference definitions (torchvision's ``resnet.py`` and ``vgg.py``; the DINO
release's ``vision_transformer.py`` with ``vit_small(patch_size=16, num_classes=0)``), one
``name dim dim ...`` line per tensor, batch norm's ``num_batches_tracked`` counters left out (the
files written before torch 0.4.1 do not have them). :data:`PUBLISHED_PARAMETERS` check the tables
themselves: torchvision's stated ``num_params`` for its three; for ViT-S/16, whose release states
only "21M", the count of DINO's layers (patch embedding, tokens, 12 blocks, final norm).
"""

from __future__ import annotations

import math

RESNET18 = """
conv1.weight 64 3 7 7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
layer1.0.conv1.weight 64 64 3 3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.conv2.weight 64 64 3 3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.1.conv1.weight 64 64 3 3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.conv2.weight 64 64 3 3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer2.0.conv1.weight 128 64 3 3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.conv2.weight 128 128 3 3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.downsample.0.weight 128 64 1 1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.1.conv1.weight 128 128 3 3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.conv2.weight 128 128 3 3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer3.0.conv1.weight 256 128 3 3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.conv2.weight 256 256 3 3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.downsample.0.weight 256 128 1 1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.1.conv1.weight 256 256 3 3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.conv2.weight 256 256 3 3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer4.0.conv1.weight 512 256 3 3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.conv2.weight 512 512 3 3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.downsample.0.weight 512 256 1 1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.1.conv1.weight 512 512 3 3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.conv2.weight 512 512 3 3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
fc.weight 1000 512
fc.bias 1000
"""

RESNET50 = """
conv1.weight 64 3 7 7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
layer1.0.conv1.weight 64 64 1 1
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.conv2.weight 64 64 3 3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.conv3.weight 256 64 1 1
layer1.0.bn3.weight 256
layer1.0.bn3.bias 256
layer1.0.bn3.running_mean 256
layer1.0.bn3.running_var 256
layer1.0.downsample.0.weight 256 64 1 1
layer1.0.downsample.1.weight 256
layer1.0.downsample.1.bias 256
layer1.0.downsample.1.running_mean 256
layer1.0.downsample.1.running_var 256
layer1.1.conv1.weight 64 256 1 1
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.conv2.weight 64 64 3 3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.conv3.weight 256 64 1 1
layer1.1.bn3.weight 256
layer1.1.bn3.bias 256
layer1.1.bn3.running_mean 256
layer1.1.bn3.running_var 256
layer1.2.conv1.weight 64 256 1 1
layer1.2.bn1.weight 64
layer1.2.bn1.bias 64
layer1.2.bn1.running_mean 64
layer1.2.bn1.running_var 64
layer1.2.conv2.weight 64 64 3 3
layer1.2.bn2.weight 64
layer1.2.bn2.bias 64
layer1.2.bn2.running_mean 64
layer1.2.bn2.running_var 64
layer1.2.conv3.weight 256 64 1 1
layer1.2.bn3.weight 256
layer1.2.bn3.bias 256
layer1.2.bn3.running_mean 256
layer1.2.bn3.running_var 256
layer2.0.conv1.weight 128 256 1 1
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.conv2.weight 128 128 3 3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.conv3.weight 512 128 1 1
layer2.0.bn3.weight 512
layer2.0.bn3.bias 512
layer2.0.bn3.running_mean 512
layer2.0.bn3.running_var 512
layer2.0.downsample.0.weight 512 256 1 1
layer2.0.downsample.1.weight 512
layer2.0.downsample.1.bias 512
layer2.0.downsample.1.running_mean 512
layer2.0.downsample.1.running_var 512
layer2.1.conv1.weight 128 512 1 1
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.conv2.weight 128 128 3 3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.conv3.weight 512 128 1 1
layer2.1.bn3.weight 512
layer2.1.bn3.bias 512
layer2.1.bn3.running_mean 512
layer2.1.bn3.running_var 512
layer2.2.conv1.weight 128 512 1 1
layer2.2.bn1.weight 128
layer2.2.bn1.bias 128
layer2.2.bn1.running_mean 128
layer2.2.bn1.running_var 128
layer2.2.conv2.weight 128 128 3 3
layer2.2.bn2.weight 128
layer2.2.bn2.bias 128
layer2.2.bn2.running_mean 128
layer2.2.bn2.running_var 128
layer2.2.conv3.weight 512 128 1 1
layer2.2.bn3.weight 512
layer2.2.bn3.bias 512
layer2.2.bn3.running_mean 512
layer2.2.bn3.running_var 512
layer2.3.conv1.weight 128 512 1 1
layer2.3.bn1.weight 128
layer2.3.bn1.bias 128
layer2.3.bn1.running_mean 128
layer2.3.bn1.running_var 128
layer2.3.conv2.weight 128 128 3 3
layer2.3.bn2.weight 128
layer2.3.bn2.bias 128
layer2.3.bn2.running_mean 128
layer2.3.bn2.running_var 128
layer2.3.conv3.weight 512 128 1 1
layer2.3.bn3.weight 512
layer2.3.bn3.bias 512
layer2.3.bn3.running_mean 512
layer2.3.bn3.running_var 512
layer3.0.conv1.weight 256 512 1 1
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.conv2.weight 256 256 3 3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.conv3.weight 1024 256 1 1
layer3.0.bn3.weight 1024
layer3.0.bn3.bias 1024
layer3.0.bn3.running_mean 1024
layer3.0.bn3.running_var 1024
layer3.0.downsample.0.weight 1024 512 1 1
layer3.0.downsample.1.weight 1024
layer3.0.downsample.1.bias 1024
layer3.0.downsample.1.running_mean 1024
layer3.0.downsample.1.running_var 1024
layer3.1.conv1.weight 256 1024 1 1
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.conv2.weight 256 256 3 3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.conv3.weight 1024 256 1 1
layer3.1.bn3.weight 1024
layer3.1.bn3.bias 1024
layer3.1.bn3.running_mean 1024
layer3.1.bn3.running_var 1024
layer3.2.conv1.weight 256 1024 1 1
layer3.2.bn1.weight 256
layer3.2.bn1.bias 256
layer3.2.bn1.running_mean 256
layer3.2.bn1.running_var 256
layer3.2.conv2.weight 256 256 3 3
layer3.2.bn2.weight 256
layer3.2.bn2.bias 256
layer3.2.bn2.running_mean 256
layer3.2.bn2.running_var 256
layer3.2.conv3.weight 1024 256 1 1
layer3.2.bn3.weight 1024
layer3.2.bn3.bias 1024
layer3.2.bn3.running_mean 1024
layer3.2.bn3.running_var 1024
layer3.3.conv1.weight 256 1024 1 1
layer3.3.bn1.weight 256
layer3.3.bn1.bias 256
layer3.3.bn1.running_mean 256
layer3.3.bn1.running_var 256
layer3.3.conv2.weight 256 256 3 3
layer3.3.bn2.weight 256
layer3.3.bn2.bias 256
layer3.3.bn2.running_mean 256
layer3.3.bn2.running_var 256
layer3.3.conv3.weight 1024 256 1 1
layer3.3.bn3.weight 1024
layer3.3.bn3.bias 1024
layer3.3.bn3.running_mean 1024
layer3.3.bn3.running_var 1024
layer3.4.conv1.weight 256 1024 1 1
layer3.4.bn1.weight 256
layer3.4.bn1.bias 256
layer3.4.bn1.running_mean 256
layer3.4.bn1.running_var 256
layer3.4.conv2.weight 256 256 3 3
layer3.4.bn2.weight 256
layer3.4.bn2.bias 256
layer3.4.bn2.running_mean 256
layer3.4.bn2.running_var 256
layer3.4.conv3.weight 1024 256 1 1
layer3.4.bn3.weight 1024
layer3.4.bn3.bias 1024
layer3.4.bn3.running_mean 1024
layer3.4.bn3.running_var 1024
layer3.5.conv1.weight 256 1024 1 1
layer3.5.bn1.weight 256
layer3.5.bn1.bias 256
layer3.5.bn1.running_mean 256
layer3.5.bn1.running_var 256
layer3.5.conv2.weight 256 256 3 3
layer3.5.bn2.weight 256
layer3.5.bn2.bias 256
layer3.5.bn2.running_mean 256
layer3.5.bn2.running_var 256
layer3.5.conv3.weight 1024 256 1 1
layer3.5.bn3.weight 1024
layer3.5.bn3.bias 1024
layer3.5.bn3.running_mean 1024
layer3.5.bn3.running_var 1024
layer4.0.conv1.weight 512 1024 1 1
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.conv2.weight 512 512 3 3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.conv3.weight 2048 512 1 1
layer4.0.bn3.weight 2048
layer4.0.bn3.bias 2048
layer4.0.bn3.running_mean 2048
layer4.0.bn3.running_var 2048
layer4.0.downsample.0.weight 2048 1024 1 1
layer4.0.downsample.1.weight 2048
layer4.0.downsample.1.bias 2048
layer4.0.downsample.1.running_mean 2048
layer4.0.downsample.1.running_var 2048
layer4.1.conv1.weight 512 2048 1 1
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.conv2.weight 512 512 3 3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.conv3.weight 2048 512 1 1
layer4.1.bn3.weight 2048
layer4.1.bn3.bias 2048
layer4.1.bn3.running_mean 2048
layer4.1.bn3.running_var 2048
layer4.2.conv1.weight 512 2048 1 1
layer4.2.bn1.weight 512
layer4.2.bn1.bias 512
layer4.2.bn1.running_mean 512
layer4.2.bn1.running_var 512
layer4.2.conv2.weight 512 512 3 3
layer4.2.bn2.weight 512
layer4.2.bn2.bias 512
layer4.2.bn2.running_mean 512
layer4.2.bn2.running_var 512
layer4.2.conv3.weight 2048 512 1 1
layer4.2.bn3.weight 2048
layer4.2.bn3.bias 2048
layer4.2.bn3.running_mean 2048
layer4.2.bn3.running_var 2048
fc.weight 1000 2048
fc.bias 1000
"""

VGG16 = """
features.0.weight 64 3 3 3
features.0.bias 64
features.2.weight 64 64 3 3
features.2.bias 64
features.5.weight 128 64 3 3
features.5.bias 128
features.7.weight 128 128 3 3
features.7.bias 128
features.10.weight 256 128 3 3
features.10.bias 256
features.12.weight 256 256 3 3
features.12.bias 256
features.14.weight 256 256 3 3
features.14.bias 256
features.17.weight 512 256 3 3
features.17.bias 512
features.19.weight 512 512 3 3
features.19.bias 512
features.21.weight 512 512 3 3
features.21.bias 512
features.24.weight 512 512 3 3
features.24.bias 512
features.26.weight 512 512 3 3
features.26.bias 512
features.28.weight 512 512 3 3
features.28.bias 512
classifier.0.weight 4096 25088
classifier.0.bias 4096
classifier.3.weight 4096 4096
classifier.3.bias 4096
classifier.6.weight 1000 4096
classifier.6.bias 1000
"""

VIT_S16 = """
cls_token 1 1 384
pos_embed 1 197 384
patch_embed.proj.weight 384 3 16 16
patch_embed.proj.bias 384
blocks.0.norm1.weight 384
blocks.0.norm1.bias 384
blocks.0.attn.qkv.weight 1152 384
blocks.0.attn.qkv.bias 1152
blocks.0.attn.proj.weight 384 384
blocks.0.attn.proj.bias 384
blocks.0.norm2.weight 384
blocks.0.norm2.bias 384
blocks.0.mlp.fc1.weight 1536 384
blocks.0.mlp.fc1.bias 1536
blocks.0.mlp.fc2.weight 384 1536
blocks.0.mlp.fc2.bias 384
blocks.1.norm1.weight 384
blocks.1.norm1.bias 384
blocks.1.attn.qkv.weight 1152 384
blocks.1.attn.qkv.bias 1152
blocks.1.attn.proj.weight 384 384
blocks.1.attn.proj.bias 384
blocks.1.norm2.weight 384
blocks.1.norm2.bias 384
blocks.1.mlp.fc1.weight 1536 384
blocks.1.mlp.fc1.bias 1536
blocks.1.mlp.fc2.weight 384 1536
blocks.1.mlp.fc2.bias 384
blocks.2.norm1.weight 384
blocks.2.norm1.bias 384
blocks.2.attn.qkv.weight 1152 384
blocks.2.attn.qkv.bias 1152
blocks.2.attn.proj.weight 384 384
blocks.2.attn.proj.bias 384
blocks.2.norm2.weight 384
blocks.2.norm2.bias 384
blocks.2.mlp.fc1.weight 1536 384
blocks.2.mlp.fc1.bias 1536
blocks.2.mlp.fc2.weight 384 1536
blocks.2.mlp.fc2.bias 384
blocks.3.norm1.weight 384
blocks.3.norm1.bias 384
blocks.3.attn.qkv.weight 1152 384
blocks.3.attn.qkv.bias 1152
blocks.3.attn.proj.weight 384 384
blocks.3.attn.proj.bias 384
blocks.3.norm2.weight 384
blocks.3.norm2.bias 384
blocks.3.mlp.fc1.weight 1536 384
blocks.3.mlp.fc1.bias 1536
blocks.3.mlp.fc2.weight 384 1536
blocks.3.mlp.fc2.bias 384
blocks.4.norm1.weight 384
blocks.4.norm1.bias 384
blocks.4.attn.qkv.weight 1152 384
blocks.4.attn.qkv.bias 1152
blocks.4.attn.proj.weight 384 384
blocks.4.attn.proj.bias 384
blocks.4.norm2.weight 384
blocks.4.norm2.bias 384
blocks.4.mlp.fc1.weight 1536 384
blocks.4.mlp.fc1.bias 1536
blocks.4.mlp.fc2.weight 384 1536
blocks.4.mlp.fc2.bias 384
blocks.5.norm1.weight 384
blocks.5.norm1.bias 384
blocks.5.attn.qkv.weight 1152 384
blocks.5.attn.qkv.bias 1152
blocks.5.attn.proj.weight 384 384
blocks.5.attn.proj.bias 384
blocks.5.norm2.weight 384
blocks.5.norm2.bias 384
blocks.5.mlp.fc1.weight 1536 384
blocks.5.mlp.fc1.bias 1536
blocks.5.mlp.fc2.weight 384 1536
blocks.5.mlp.fc2.bias 384
blocks.6.norm1.weight 384
blocks.6.norm1.bias 384
blocks.6.attn.qkv.weight 1152 384
blocks.6.attn.qkv.bias 1152
blocks.6.attn.proj.weight 384 384
blocks.6.attn.proj.bias 384
blocks.6.norm2.weight 384
blocks.6.norm2.bias 384
blocks.6.mlp.fc1.weight 1536 384
blocks.6.mlp.fc1.bias 1536
blocks.6.mlp.fc2.weight 384 1536
blocks.6.mlp.fc2.bias 384
blocks.7.norm1.weight 384
blocks.7.norm1.bias 384
blocks.7.attn.qkv.weight 1152 384
blocks.7.attn.qkv.bias 1152
blocks.7.attn.proj.weight 384 384
blocks.7.attn.proj.bias 384
blocks.7.norm2.weight 384
blocks.7.norm2.bias 384
blocks.7.mlp.fc1.weight 1536 384
blocks.7.mlp.fc1.bias 1536
blocks.7.mlp.fc2.weight 384 1536
blocks.7.mlp.fc2.bias 384
blocks.8.norm1.weight 384
blocks.8.norm1.bias 384
blocks.8.attn.qkv.weight 1152 384
blocks.8.attn.qkv.bias 1152
blocks.8.attn.proj.weight 384 384
blocks.8.attn.proj.bias 384
blocks.8.norm2.weight 384
blocks.8.norm2.bias 384
blocks.8.mlp.fc1.weight 1536 384
blocks.8.mlp.fc1.bias 1536
blocks.8.mlp.fc2.weight 384 1536
blocks.8.mlp.fc2.bias 384
blocks.9.norm1.weight 384
blocks.9.norm1.bias 384
blocks.9.attn.qkv.weight 1152 384
blocks.9.attn.qkv.bias 1152
blocks.9.attn.proj.weight 384 384
blocks.9.attn.proj.bias 384
blocks.9.norm2.weight 384
blocks.9.norm2.bias 384
blocks.9.mlp.fc1.weight 1536 384
blocks.9.mlp.fc1.bias 1536
blocks.9.mlp.fc2.weight 384 1536
blocks.9.mlp.fc2.bias 384
blocks.10.norm1.weight 384
blocks.10.norm1.bias 384
blocks.10.attn.qkv.weight 1152 384
blocks.10.attn.qkv.bias 1152
blocks.10.attn.proj.weight 384 384
blocks.10.attn.proj.bias 384
blocks.10.norm2.weight 384
blocks.10.norm2.bias 384
blocks.10.mlp.fc1.weight 1536 384
blocks.10.mlp.fc1.bias 1536
blocks.10.mlp.fc2.weight 384 1536
blocks.10.mlp.fc2.bias 384
blocks.11.norm1.weight 384
blocks.11.norm1.bias 384
blocks.11.attn.qkv.weight 1152 384
blocks.11.attn.qkv.bias 1152
blocks.11.attn.proj.weight 384 384
blocks.11.attn.proj.bias 384
blocks.11.norm2.weight 384
blocks.11.norm2.bias 384
blocks.11.mlp.fc1.weight 1536 384
blocks.11.mlp.fc1.bias 1536
blocks.11.mlp.fc2.weight 384 1536
blocks.11.mlp.fc2.bias 384
norm.weight 384
norm.bias 384
"""
LAYOUTS = {"resnet18": RESNET18, "resnet50": RESNET50, "vgg16": VGG16, "vit_s16": VIT_S16}
#: the classifier head of each file, which metarun's backbones do not build
HEADS = {"resnet18": ("fc.",), "resnet50": ("fc.",), "vgg16": ("classifier.",), "vit_s16": ()}
PUBLISHED_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544, "vit_s16": 21_665_664}


def layout(arch: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of ``arch``'s published file, in the file's order."""
    rows = (line.split() for line in LAYOUTS[arch].strip().splitlines())
    return {name: tuple(int(d) for d in dims) for name, *dims in rows}


def parameter_count(arch: str) -> int:
    return sum(math.prod(shape) for name, shape in layout(arch).items() if "running_" not in name)
