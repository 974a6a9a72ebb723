"""utils/heap.py: after keep_freed_memory(), big tensors allocated again reuse freed pages (no page faults).

Each case runs in a fresh interpreter (the setting is process-wide). The negative control is the same loop
without the call: glibc then maps every 64 MB tensor freshly and its pages fault in on every allocation.
"""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import resource, sys, torch
if sys.argv[1] == "1":
    from utils.heap import keep_freed_memory
    assert keep_freed_memory()
x, w = torch.randn(4096, 64), torch.randn(4096, 64)
def faults_of_one_step():  # a sampling step's pattern: 64 MB of logits, 64 MB of probabilities, both freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = x @ w.t()
    probs = logits.softmax(-1)
    del logits, probs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
steps = [faults_of_one_step() for _ in range(16)]
# glibc's heap settles after a few steps (posix_memalign leaves small remainders); a later step can still grow
# the heap's top once (64 MB: 16384 faults, seen once in a full test run), so the median of the last 8 steps
print(sorted(steps[-8:])[4])
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc settings")


def faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if keep else "0"], capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).parents[1]))
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    assert faults(keep=True) < 100  # 128 MB per step = 32768 pages of 4 KB


def test_without_it_every_big_allocation_faults_its_pages_in():
    assert faults(keep=False) > 16000  # the negative control: the test above can fail
