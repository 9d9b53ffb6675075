import resource
import sys

import pytest
import torch

from metarun.allocator import keep_freed_memory


def minor_faults_of_a_fresh_block(mb: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(mb << 20, dtype=torch.uint8).fill_(1)  # touches every page, then frees the block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    assert keep_freed_memory()
    pages = (64 << 20) // resource.getpagesize()
    minor_faults_of_a_fresh_block(64)  # the heap grows once
    assert minor_faults_of_a_fresh_block(64) < pages // 20  # without it: munmap on free, every page faulted again
