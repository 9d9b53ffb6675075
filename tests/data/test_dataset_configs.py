"""Every dataset option's YAML composes into exactly its loader's keyword arguments."""

import inspect
from pathlib import Path

import pytest
from hydra._internal.utils import _locate
from omegaconf import MISSING, OmegaConf

from metarun.factory import ENGINE_KEYS
from tests.conftest import dataset_config

OPTIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("name", OPTIONS)
def test_yaml_keys_and_defaults_are_the_loaders(name):
    node = OmegaConf.to_container(dataset_config(name), resolve=False)
    loader = _locate(node.pop("_target_"))
    for key in ENGINE_KEYS:
        node.pop(key)
    params = inspect.signature(loader).parameters
    params = {k: p for k, p in params.items() if k != "build_dataset"}  # the factory passes itself to dataset=multi
    assert set(node) == set(params)
    for key, value in node.items():
        default = params[key].default
        if value == MISSING:
            assert default is inspect.Parameter.empty, key
        else:
            assert value == (list(default) if isinstance(default, tuple) else default), key
