"""Fault in a host tensor's pages with one system call per range instead of one page fault per 4 KiB page.

Most of a CPU import's time is the kernel providing fresh pages for the parameters (the real-width 2-layer
fixture in fp32 is 2.4 M pages). When a copy first writes a page, the CPU traps into the kernel for that page alone;
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) makes the same pages writable-present in one call, without a trap
per page. Measured here on the real-width fixture (bf16 -> fp32 conversion of every tensor, 2 cores): 2.44 M
faults either way, but 13.7 s of kernel CPU instead of 16.2-17.9 s (and 0.5 s more user CPU: the populated
pages are cold in the cache when the copy writes them); with a range split over both cores, 7.9 s wall instead
of 8.9-9.8 s (docs/bridge.md). The pages are the ones the copy writes next anyway, so memory use is unchanged.

Only an optimisation: on another OS, an older kernel, a GPU tensor or a non-contiguous view, :func:`populate`
does nothing and the copy faults the pages in as usual.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import sys
from concurrent.futures import Executor

import torch

logger = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14+)
MIN_BYTES = 1 << 20  # below this the system call is not worth it
SPLIT_BYTES = 64 << 20  # ranges above this are split in two, one half on the helper thread

_madvise = None
if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _madvise = _libc.madvise  # ctypes releases the GIL during the call
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int


def _populate_range(start: int, length: int) -> bool:
    """True when the kernel populated ``[start, start + length)`` (page aligned)."""
    global _madvise
    call = _madvise
    if call is None:
        return False
    if call(start, length, MADV_POPULATE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINTR:  # interrupted by a signal: the pages fault in on first write instead
        return False
    # EINVAL: kernel before 5.14; anything else: leave the pages to ordinary faults from now on.
    logger.debug("MADV_POPULATE_WRITE unavailable (%s); parameter pages fault in on first write",
                 errno.errorcode.get(err, err))
    _madvise = None
    return False


def populate(tensor: torch.Tensor, helper: Executor | None = None) -> bool:
    """Make the pages under ``tensor`` (freshly allocated host memory, such as a parameter about to be loaded)
    present and writable before it is written (see module docstring).

    With ``helper``, a range over :data:`SPLIT_BYTES` is populated half here and half on the helper's thread,
    so one large tensor keeps two cores busy. Returns whether the pages were populated."""
    nbytes = tensor.numel() * tensor.element_size()
    if _madvise is None or tensor.device.type != "cpu" or nbytes < MIN_BYTES or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + nbytes
    if helper is None or end - start <= SPLIT_BYTES:
        return _populate_range(start, end - start)
    middle = (start + end) // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    other = helper.submit(_populate_range, middle, end - middle)
    here = _populate_range(start, middle - start)
    return other.result() and here
