import subprocess
import sys

import pytest

# Second-order MAML steps in a fresh interpreter (as the CLI runs them, keep_freed_memory() first): the
# page faults of each step. With the freed activations kept, faults fall by two orders of magnitude within a
# few steps. The control fixes glibc's thresholds at their static defaults (128 KB, which also stops them
# adapting), so every step hands its activations back and faults them in again. glibc's adaptive
# defaults land in between, and where depends on the machine: 35,000-70,000 faults a step on one,
# 7,800 by the fifth step on another, so they make no control.
PROBE = """
import ctypes, resource, sys, torch
from metarun.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
from metarun.algorithms.maml import MAML
from metarun.data.episodes import Episode
from metarun.models.conv4 import Conv4

if sys.argv[1] == "keep":
    kept = keep_freed_memory()
else:
    mallopt = ctypes.CDLL(None).mallopt
    kept = bool(mallopt(M_MMAP_THRESHOLD, 128 * 1024) and mallopt(M_TRIM_THRESHOLD, 128 * 1024))
torch.manual_seed(0)
algo = MAML(Conv4((1, 28, 28)), 5)
y = torch.arange(5).expand(16, -1)
episode = Episode(torch.randn(16, 5, 1, 28, 28), y, torch.randn(16, 5, 1, 28, 28), y, 5)

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _ = algo.training_loss(episode)
    loss.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(kept, *[step() for _ in range(8)])
"""


def faults_per_step(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], [int(f) for f in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_meta_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    kept, faults = faults_per_step("keep")
    assert kept == "True"
    returned, control = faults_per_step("return")
    assert returned == "True"
    assert min(control[1:]) > 10_000, control  # every step faults its activations in again (380,000)
    # Kept, the heap still grows now and then by a block or a few (about 2,000 pages each): measured
    # [100,000, 8,000-25,000, then 0-12,000 a step, 12,000-20,000 in all over the last six steps].
    assert sum(faults[2:]) < sum(control[2:]) / 50, faults
