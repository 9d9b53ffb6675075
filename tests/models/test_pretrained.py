"""Pre-trained backbones: the published layouts, weight sources (local files, the download path), freezing."""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from metarun.errors import ConfigError, DataError
from metarun.models import pretrained
from metarun.models.freeze import FrozenBatchNorm
from metarun.models.norm import EpisodeBatchNorm, norm_statistics
from metarun.models.resnet import ResNet18, ResNet50
from metarun.models.vgg import VGG16
from metarun.models.vit import ViTS16
from tests.helpers.http_server import LocalHTTPServer
from tests.models.published_layouts import HEADS, LAYOUTS, PUBLISHED_PARAMETERS, layout, parameter_count

BACKBONES = {"resnet18": ResNet18, "resnet50": ResNet50, "vgg16": VGG16, "vit_s16": ViTS16}
#: tensors in each published file: parameters and running statistics, num_batches_tracked aside
FILE_TENSORS = {"resnet18": 102, "resnet50": 267, "vgg16": 32, "vit_s16": 150}


def build(arch: str, **kwargs) -> torch.nn.Module:
    return BACKBONES[arch]((3, 32, 32), image_size=32, **kwargs)


def published_state(arch: str, seed: int = 0, counters: bool = False) -> dict[str, torch.Tensor]:
    """A state dict with exactly the published names and shapes (random values; variances positive)."""
    g = torch.Generator().manual_seed(seed)
    head = HEADS[arch] or ("\0",)
    # the heads are dropped unread: one shared zero stands for VGG's 120 million classifier weights
    state = {
        name: torch.zeros(()).expand(shape) if name.startswith(head) else torch.rand(shape, generator=g) + 0.5
        for name, shape in layout(arch).items()
    }
    if counters:
        for name in [n for n in state if n.endswith("running_mean")]:
            state[name.replace("running_mean", "num_batches_tracked")] = torch.tensor(7)
    return state


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- the published layouts ------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_the_layout_tables_hold_the_published_counts(arch):
    assert len(layout(arch)) == FILE_TENSORS[arch]
    assert parameter_count(arch) == PUBLISHED_PARAMETERS[arch]


def test_resnet18_has_62_parameter_tensors_and_100_file_tensors_besides_its_head():
    names = layout("resnet18")
    assert sum("running_" not in n for n in names) == 62  # fc.weight and fc.bias included
    assert sum(not n.startswith("fc.") for n in names) == 100


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_backbone_has_exactly_the_published_names_and_shapes_without_the_head(arch):
    own = {k: tuple(v.shape) for k, v in build(arch).state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = {k: v for k, v in layout(arch).items() if not k.startswith(HEADS[arch] or ("\0",))}
    assert own == expected


@pytest.mark.parametrize("counters", [False, True])
@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_a_published_state_dict_loads_strictly(arch, counters):
    state = published_state(arch, counters=counters)
    model = build(arch)
    model.load_published(state)
    loaded = model.state_dict()
    for name, value in state.items():
        if not name.startswith(HEADS[arch] or ("\0",)):
            assert torch.equal(loaded[name], value), name


def test_a_state_dict_of_another_network_names_the_keys_that_differ():
    state = published_state("resnet18")
    del state["layer1.0.conv1.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(DataError, match=r"missing: layer1\.0\.conv1\.weight; unexpected: layer5\.0\.conv1\.weight"):
        build("resnet18").load_published(state)
    with pytest.raises(DataError, match="other shape: conv1.weight"):
        build("resnet18").load_published({**published_state("resnet18"), "conv1.weight": torch.zeros(64, 3, 3, 3)})


# -- local files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"model": {**{f"backbone.{k}": v for k, v in s.items()}, "head.weight": torch.zeros(5, 512)}},
    ],
    ids=["state_dict", "checkpoint", "model_key", "data_parallel", "metarun_checkpoint"],
)
def test_local_weight_files_load(tmp_path, wrap):
    state = published_state("resnet18", seed=3)
    path = tmp_path / "weights.pth"
    torch.save(wrap(state), path)
    model = ResNet18((3, 32, 32), image_size=32, weights=str(path))
    assert torch.equal(model.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])


def test_a_missing_or_unreadable_local_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ResNet18((3, 32, 32), image_size=32, weights=str(tmp_path / "nope.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="not a readable state dict"):
        ResNet18((3, 32, 32), image_size=32, weights=str(tmp_path / "bad.pth"))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(DataError, match="holds no state dict"):
        ResNet18((3, 32, 32), image_size=32, weights=str(tmp_path / "empty.pth"))


# -- the download path ----------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in a fresh folder ($TORCH_HOME), and the URL table restored afterwards."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "URLS", dict(pretrained.URLS))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as running:
        yield running


def serve(server: LocalHTTPServer, arch: str, payload: bytes, hash_prefix: str | None = None) -> str:
    """Serves ``payload`` under a torchvision-style name carrying ``hash_prefix`` (default: the payload's)."""
    prefix = hash_prefix or hashlib.sha256(payload).hexdigest()[:8]
    name = f"/{arch}-{prefix}.pth"
    server.files[name] = payload
    pretrained.URLS[arch] = server.url + name
    return name[1:]


def test_imagenet_weights_download_once_into_the_hub_cache(hub, server):
    state = published_state("resnet18", seed=5)
    name = serve(server, "resnet18", saved_bytes(state))
    model = ResNet18((3, 32, 32), image_size=32, weights="imagenet")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert (hub / name).is_file()
    again = ResNet18((3, 32, 32), image_size=32, weights="imagenet")  # from the cache, hash checked again
    assert torch.equal(again.bn1.running_mean, state["bn1.running_mean"])
    assert len(server.requests) == 1


def test_a_download_with_the_wrong_hash_is_refused(hub, server):
    name = serve(server, "resnet18", saved_bytes(published_state("resnet18")), hash_prefix="0123abcd")
    with pytest.raises(DataError, match="does not match its published hash: nothing loaded") as e:
        ResNet18((3, 32, 32), image_size=32, weights="imagenet")
    assert "\n" not in str(e.value)
    assert not (hub / name).exists() and not list(hub.glob("*.partial"))


def test_a_cached_file_with_the_wrong_hash_is_set_aside(hub, server):
    name = serve(server, "resnet18", saved_bytes(published_state("resnet18")))
    hub.mkdir(parents=True)
    (hub / name).write_bytes(b"truncated")
    with pytest.raises(DataError, match="does not match its published hash.*nothing loaded"):
        ResNet18((3, 32, 32), image_size=32, weights="imagenet")
    assert (hub / f"{name}.corrupt").read_bytes() == b"truncated" and not (hub / name).exists()
    assert not server.requests
    ResNet18((3, 32, 32), image_size=32, weights="imagenet")  # the next run downloads it afresh
    assert (hub / name).is_file() and len(server.requests) == 1


def test_a_cached_file_without_a_hash_that_does_not_load_is_set_aside(hub):
    pretrained.URLS["vit_s16"] = "http://127.0.0.1:9/dino_deitsmall16_pretrain.pth"
    hub.mkdir(parents=True)
    (hub / "dino_deitsmall16_pretrain.pth").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(DataError, match="not a readable weight file.*moved to dino_deitsmall16_pretrain.pth.corrupt"):
        ViTS16((3, 32, 32), image_size=32, weights="imagenet")
    assert (hub / "dino_deitsmall16_pretrain.pth.corrupt").exists()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_without_a_cached_file_names_the_file_and_where_to_put_it(hub):
    pretrained.URLS["vgg16"] = f"http://127.0.0.1:{_unused_port()}/vgg16-397923af.pth"
    with pytest.raises(DataError) as e:
        VGG16((3, 32, 32), image_size=32, weights="imagenet")
    message = str(e.value)
    assert "vgg16-397923af.pth" in message and str(hub / "vgg16-397923af.pth") in message and "\n" not in message


def test_the_published_urls_are_the_publishers():
    assert pretrained.URLS == {
        "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "vit_s16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    }


def test_load_weights_false_reads_no_file(hub):
    pretrained.URLS["resnet18"] = f"http://127.0.0.1:{_unused_port()}/resnet18-f37072fd.pth"
    model = ResNet18((1, 28, 28), image_size=32, weights="imagenet", load_weights=False)
    assert model.inputs.renormalize  # still the network ImageNet weights expect
    assert not hub.exists() or not list(hub.iterdir())


# -- freezing ---------------------------------------------------------------------------------------
def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_freeze_all_fixes_every_weight_and_the_statistics():
    model = build("resnet18", freeze="all")
    model.load_published(published_state("resnet18"))
    assert not any(p.requires_grad for p in model.parameters())
    assert all(isinstance(m, FrozenBatchNorm) for m in norm_layers(model)) and len(norm_layers(model)) == 20
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    expected = model(x)
    model.train()
    with norm_statistics(model, "batch", tasks=2):  # what an algorithm asks of the episode-aware layers
        y = model(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_freeze_bn_fixes_the_statistics_and_trains_the_rest():
    model = build("resnet18", freeze="bn")
    model.load_published(published_state("resnet18"))
    running = model.layer2[0].bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.layer2[0].bn1.running_mean, running)
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())
    # the layer normalises with its running statistics: the same as eval-mode batch norm by hand
    layer, x = model.layer2[0].bn1, torch.randn(3, 128, 4, 4)
    ref = (x - layer.running_mean[:, None, None]) / (layer.running_var[:, None, None] + layer.eps).sqrt()
    torch.testing.assert_close(layer(x), ref * layer.weight[:, None, None] + layer.bias[:, None, None])


def test_freeze_none_trains_everything_with_batch_statistics():
    model = build("resnet18")
    assert all(isinstance(m, EpisodeBatchNorm) for m in norm_layers(model))
    running = model.bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(model.bn1.running_mean, running)


def test_freeze_bn_without_batch_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="vit_s16 has no batch norm"):
        ViTS16((3, 32, 32), image_size=32, freeze="bn")
    with pytest.raises(ConfigError, match="valid values are none, bn, all"):
        build("vgg16", freeze="some")
    assert not any(p.requires_grad for p in build("vgg16", freeze="all").parameters())


# -- inputs -------------------------------------------------------------------------------------------
def test_a_grey_glyph_goes_through_resnet18_at_a_small_size():
    model = ResNet18((1, 28, 28), image_size=32, weights="none", data_stats=((0.2,), (0.3,)))
    model.eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 512) and torch.isfinite(out).all()


def test_image_sizes_a_backbone_cannot_take_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of 16"):
        ViTS16((3, 32, 32), image_size=40)
    with pytest.raises(ConfigError, match="at least 32"):
        VGG16((3, 32, 32), image_size=16)
    with pytest.raises(ConfigError, match="1- or 3-channel"):
        ResNet18((4, 32, 32), image_size=32)
