"""host_pages.populate: the pages of a fresh parameter are present before the copy writes them."""

from __future__ import annotations

import mmap
import resource
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gemma4vl.bridge import host_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux-only")

MB = 1 << 20
PAGE = mmap.PAGESIZE  # as host_pages aligns


def _faults_while(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.parametrize("helper", [False, True], ids=["one-call", "split-over-two-threads"])
def test_populated_pages_take_no_fault_when_written(helper):
    # 96 MB: above glibc's largest mmap threshold (32 MB), so torch.empty returns fresh, never-touched pages;
    # above SPLIT_BYTES, so the helper takes half.
    nbytes = 96 * MB
    pool = ThreadPoolExecutor(1) if helper else None
    try:
        fresh = torch.empty(nbytes // 4, dtype=torch.float32)
        assert host_pages.populate(fresh, pool) is True
        # every page was already there (what faults remains is the interpreter's and OpenMP's own, ~30)
        assert _faults_while(lambda: fresh.fill_(1.0)) < nbytes // PAGE // 100
        assert float(fresh.sum()) == nbytes // 4
        control = torch.empty(nbytes // 4, dtype=torch.float32)
        faults = _faults_while(lambda: control.fill_(1.0))
        if not _thp_always():  # with huge pages everywhere a 96 MB fill faults ~48 times, not 24 K
            assert faults > 0.9 * nbytes // PAGE
    finally:
        if pool:
            pool.shutdown()


def test_populate_skips_what_it_cannot_or_need_not_do():
    assert host_pages.populate(torch.empty(1024)) is False  # 4 KB: below MIN_BYTES
    wide = torch.empty(1024, 2048)
    assert host_pages.populate(wide[:, ::2]) is False  # not contiguous
    assert host_pages.populate(wide[:512]) is True  # a contiguous slice of a parameter (q rows of linear_qkv)


def test_a_refusing_kernel_turns_populate_off(monkeypatch):
    # An unaligned start is what an older kernel's EINVAL looks like: the first refusal turns the system call off
    # for the process and the copies fault their pages in as before.
    monkeypatch.setattr(host_pages, "_madvise", host_pages._madvise)
    base = torch.empty(4 * MB // 4)
    assert host_pages._populate_range(base.data_ptr() // PAGE * PAGE + 1, PAGE) is False
    assert host_pages._madvise is None
    assert host_pages.populate(torch.empty(4 * MB // 4)) is False
