"""``python -m tests.helpers.patched_cli '<json>' <metarun arguments>``: the real CLI with a few module constants replaced.

Some failures cannot be staged from outside the process: a corrupt zip that
carries the official md5, or a download from a local server rather than the
dataset's host. The JSON maps ``module:NAME`` to the value it takes in this
process (a dict value updates the module's dict, so entries not named stay).
"""

from __future__ import annotations

import importlib
import json
import sys

from metarun.cli import main


def apply(patches: dict) -> None:
    for target, value in patches.items():
        module_name, name = target.split(":")
        module = importlib.import_module(module_name)
        if isinstance(value, dict):
            getattr(module, name).update(value)
        else:
            setattr(module, name, value)


if __name__ == "__main__":
    apply(json.loads(sys.argv[1]))
    main(sys.argv[2:])
