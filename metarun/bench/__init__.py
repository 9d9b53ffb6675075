"""``make bench`` / ``metarun bench``: how fast the package is, as ratios to plain code timed in the same run.

* :mod:`metarun.bench.command` - the command: what is timed, the table and the JSON it writes;
* :mod:`metarun.bench.shapes` - the episode shapes, the settings of the fast paths, the targets;
* :mod:`metarun.bench.timing` - interleaved timing and peak memory;
* :mod:`metarun.bench.references` - the plain per-task code the package is compared with (the tests check
  the package's gradients against the same code).
* :mod:`metarun.bench.peer_learn2learn` - ``--peer learn2learn``: learn2learn's own code on the same shapes
  (imported only then, from the environment ``scripts/install_learn2learn.sh`` builds).
"""

from metarun.bench.command import main

__all__ = ["main"]
