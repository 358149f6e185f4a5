"""Memory reuse for the group record codec (issue 3, `proxmo bench buffer`).

A realistic group (8 episodes x 50 steps, ~1k-token prompts) needs ~1.6 MB of
int32 prompt ids on each side plus ~2.5 MB of encode temporaries. Fresh
buffers of that size come from malloc as new pages (mmap, or heap that was
trimmed back to the kernel) and every first touch of a 4 KB page is a page
fault: ~800 per encode and ~400 per decode, measured with ``ru_minflt``, about
half of the codec's CPU time on the loaded 2-core dev machine. Two fixes:

- :func:`scratch`: per-thread buffers for data that never leaves a call
  (the encoder's concatenated ids and its wire image). Kept, so they fault once.
- :class:`RecycledBlocks`: the memory behind decoded id arrays, which *does*
  leave the call (the learner keeps the arrays). A block goes back to a small
  pool only when the last array viewing it is garbage-collected, so no live
  array ever shares memory with another record.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

SCRATCH_MAX = 32 << 20  # larger needs are allocated per call instead of kept
_local = threading.local()


def scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable uint8 buffer ``name`` with at least ``nbytes`` bytes.

    The caller must not let the buffer (or a view of it) outlive its call: the
    next call in the same thread overwrites it.
    """
    if nbytes > SCRATCH_MAX:
        return np.empty(nbytes, np.uint8)
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get(name)
    if buf is None or len(buf) < nbytes:
        buf = bufs[name] = np.empty(max(nbytes, 1 << 16, 2 * len(buf) if buf is not None else 0), np.uint8)
    return buf


class RecycledBlocks:
    """Writable arrays over memory that is reused once every array viewing it is gone.

    ``take`` returns a fresh-to-the-caller uint8 array whose memory is a
    ``bytearray`` block. The array is the base of all its slices and views
    (numpy collapses view chains to it), so its finalizer runs only after the
    last of them dies; only then does the block return to the pool. At most
    ``max_bytes`` of free blocks are kept; blocks are reused only for requests
    of at least half their size, so a small record never pins a large block.
    """

    def __init__(self, max_bytes: int = 64 << 20, min_block: int = 256 << 10) -> None:
        self.max_bytes = max_bytes
        self.min_block = min_block  # smaller requests are plain allocations
        self._free: list[bytearray] = []
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < self.min_block or nbytes > self.max_bytes:
            return np.empty(nbytes, np.uint8)
        block = None
        with self._lock:
            for i, b in enumerate(self._free):
                if nbytes <= len(b) <= 2 * nbytes:
                    block = self._free.pop(i)
                    self._free_bytes -= len(block)
                    break
        if block is None:
            block = bytearray(nbytes)
        arr = np.frombuffer(block, np.uint8)[:nbytes] if len(block) > nbytes else np.frombuffer(block, np.uint8)
        owner = arr.base if isinstance(arr.base, np.ndarray) else arr
        weakref.finalize(owner, self._give_back, block)
        return arr

    def _give_back(self, block: bytearray) -> None:
        with self._lock:
            if self._free_bytes + len(block) <= self.max_bytes:
                self._free.append(block)
                self._free_bytes += len(block)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._free_bytes
