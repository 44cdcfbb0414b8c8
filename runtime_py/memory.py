"""Resident memory of this process and of other processes: current, peak, and the peak's reset.

Readings come from /proc on Linux (psutil where /proc is missing); nothing here imports more than
the standard library. Used by the benchmarks (one process per measured file) and by the export's
stage report (:mod:`export.stages`: the peak of each stage, in the export's process and its worker).

Two measures: the resident set (RSS; its peak ``VmHWM``), and its anonymous part (``RssAnon``: heap,
stacks, private allocations). The rest of the RSS is pages of files (shared libraries, memory-mapped
files), which the system writes back or drops under memory pressure; anonymous pages can only be
swapped, so they are what running out of memory is about. The kernel keeps no peak of the anonymous
part: :class:`AnonPeak` samples it.

Two settings make the memory-heavy work cheaper on the machines this project measures on, where the
kernel's first touch of a fresh page is slow (about 1.6 us per 4 KiB page, and tens of microseconds per
transparent huge page, most of it zeroing): :func:`avoid_numpy_huge_pages` and :func:`reuse_freed_memory`
(numbers in their docstrings; docs/EXPORT.md, "Page faults").
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import threading
from typing import Iterable, Optional, Tuple

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm(pid) -> Tuple[int, int]:
    """(resident, anonymous resident) bytes of process ``pid`` (``"self"`` for this one) from /proc/PID/statm,
    whose third field counts the resident pages backed by files or shared memory (``RssFile + RssShmem``):
    the rest of the resident pages are ``RssAnon``."""
    with open(f"/proc/{pid}/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]), int(fields[2])
    return resident * PAGE_SIZE, (resident - shared) * PAGE_SIZE


def _statm_rss(pid) -> int:
    """Resident size (bytes) of process ``pid`` (``"self"`` for this one) from /proc/PID/statm."""
    return _statm(pid)[0]


def rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc (psutil if /proc is missing)."""
    try:
        return _statm_rss("self")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, or since the last :func:`reset_peak_rss` (bytes).

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's
    own address space. ``getrusage`` ``ru_maxrss`` is not used there because Linux
    carries it across fork and exec: a worker started by a parent holding 360 MB
    reported 360 MB peak before it loaded anything (measured), and it cannot be reset.
    Elsewhere ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def reset_peak_rss() -> bool:
    """Start a new peak: the high-water mark becomes the current resident size (Linux >= 4.0, writing 5
    to /proc/self/clear_refs). Returns False where that is not possible: the peak then keeps counting
    from the start of the process, an upper bound of the peak since the call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def anon_rss_bytes() -> int:
    """Current anonymous resident size of this process (bytes; ``RssAnon``), 0 where /proc is missing."""
    try:
        return _statm("self")[1]
    except OSError:
        return 0


def resident_of(pids: Iterable) -> Tuple[int, int]:
    """Summed current (resident, anonymous resident) bytes of the processes ``pids`` (``"self"`` for this one);
    a process that has ended counts 0."""
    total, anon = 0, 0
    for pid in pids:
        try:
            rss, private = _statm(pid if pid == "self" else int(pid))
        except (OSError, ValueError, IndexError):
            continue
        total, anon = total + rss, anon + private
    return total, anon


def rss_of(pids: Iterable[int]) -> int:
    """Summed current resident size of the processes ``pids`` (bytes); a process that has ended counts 0."""
    return resident_of(pids)[0]


class AnonPeak:
    """Peak anonymous resident memory of this process since the last :meth:`reset`, sampled: every ``every``
    seconds by a thread of its own, or (``every=None``) by whoever calls :meth:`observe`. :meth:`peak` also counts
    the moment it is asked; a rise and fall between two samples is missed. Its own thread samples the whole
    resident size too (:meth:`resident_peak`: a peak within a stage that does not restart ``VmHWM``)."""

    def __init__(self, every: Optional[float] = 0.2):
        self._lock = threading.Lock()
        self._peak = anon_rss_bytes()
        self._resident = rss_bytes()
        self._stop = threading.Event()
        self._thread = None
        if every is not None:
            self._thread = threading.Thread(target=self._sample, args=(every,), name="anon-peak", daemon=True)
            self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.observe(anon_rss_bytes())
            resident = rss_bytes()
            with self._lock:
                self._resident = max(self._resident, resident)

    def observe(self, value: int) -> None:
        with self._lock:
            self._peak = max(self._peak, int(value))

    def reset(self) -> None:
        with self._lock:
            self._peak = anon_rss_bytes()
            self._resident = rss_bytes()

    def resident_peak(self) -> int:
        resident = rss_bytes()
        with self._lock:
            self._resident = max(self._resident, resident)
            return self._resident

    def peak(self) -> int:
        self.observe(anon_rss_bytes())
        with self._lock:
            return self._peak

    def close(self) -> None:
        self._stop.set()


def give_back() -> int:
    """Return to the system what this process has freed but the C allocator still holds: unreachable Python
    objects collected, then glibc's ``malloc_trim`` (nothing where the C library is not glibc). Returns the bytes
    of anonymous memory given back. A PyTorch forward pass at 512x680 left 346 MiB of freed heap this way
    (571 -> 225 MiB after it; docs/EXPORT.md, the memory section)."""
    import gc

    before = anon_rss_bytes()
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return max(0, before - anon_rss_bytes())


#: numpy's own switch (read when numpy is imported): 0 = no ``madvise(MADV_HUGEPAGE)`` on its arrays
NUMPY_HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


def avoid_numpy_huge_pages() -> bool:
    """Stop numpy asking Linux for transparent huge pages for its arrays, in this process and, through the
    environment it inherits, in the processes it starts; unless ``$NUMPY_MADVISE_HUGEPAGE`` already says what
    to do. Returns whether it changed the setting.

    numpy advises huge pages for every array of 4 MiB or more. Where transparent huge pages are ``madvise``
    with ``defrag=madvise`` (these machines), such pages cost more system time than the small ones: the
    Core ML reference executor's 512x680 inference took 6.1 s with it and 3.7 s without (1.0 M small-page
    faults instead, 1.5 s of system time), with the same result."""
    if NUMPY_HUGEPAGE_ENV in os.environ:
        return False
    os.environ[NUMPY_HUGEPAGE_ENV] = "0"
    import importlib

    # numpy 2's name for the module; numpy 1.26 answers to it too (and warns about neither)
    importlib.import_module("numpy._core.multiarray")._set_madvise_hugepage(False)
    return True


# glibc mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX = 65536
_TRIM_AFTER = 64 << 20  # the trim threshold glibc's own dynamic rule reaches (twice its largest mmap threshold)
_reuse_lock = threading.Lock()
_reuse_depth = 0


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library, where it is glibc (its ``mallopt`` and ``malloc_trim``); None elsewhere. Looked up once:
    ``platform.libc_ver`` reads the interpreter's executable."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory():
    """Inside, freed memory stays with the allocator for the next allocation instead of going back to the system
    at once; on leaving, whatever is still free goes back (``malloc_trim``). For loops that allocate and free
    the same large arrays many times -- a forward pass, one inference of the Core ML reference executor.
    Nests; a no-op where the C library is not glibc.

    glibc serves every allocation of 32 MiB or more (a 1024x1360 activation is 180 MiB) with a fresh ``mmap``
    and unmaps it when freed, so each one is faulted in again, page by page. Inside this block it serves them
    from its heap and keeps that heap. Measured on the default model at 1024x1360, 2 threads: a PyTorch forward
    13.1 -> 9.5 s (4.2 M page faults -> 0.6 M; anonymous peak 2.6 -> 2.7 GiB, once 3.7 GiB of four runs), one
    Core ML executor inference 18.2 -> 11.7 s (peak resident 2.3 -> 2.9 GiB), the results bit for bit the
    same. What is allocated inside and kept after it comes from the heap too, and goes back to the system once
    freed, at the next trim (the end of a later block, or :func:`give_back`).

    The price is memory, freed blocks left between live ones, and it depends on the block: in a full export at
    1024x1360 the input means' forwards peaked 0.1 GiB higher, the fallback's sensitivity and simulations (which
    allocate more around each convolution, or keep its outputs) 1.5-2.1 GiB higher, over the memory budget. So
    the export uses it for the executor (one block over the samples of each package it gates), the input means,
    the parity gate's PyTorch references and the op inventories only, the last giving back what the block holds
    (:func:`give_back`, which trims inside a block too) before a load that could take the processes over the
    budget: whether a large allocation fits in what the block holds depends on the heap's layout
    (docs/EXPORT.md, "Page faults")."""
    global _reuse_depth
    libc = _glibc()
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1 and libc is not None:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1 reaches glibc as SIZE_MAX: never trim on free
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0 and libc is not None:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                libc.malloc_trim(0)


def mib(n_bytes) -> float:
    return float(n_bytes) / (1 << 20)
