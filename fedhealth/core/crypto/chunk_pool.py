"""Site-side CKKS work spread over processes, a range of ciphertexts each.

Why processes. TenSEAL's `sealapi` bindings hold the GIL while SEAL encodes, encrypts and
decrypts: two threads encrypting 1000 ciphertexts used exactly as much CPU time as wall time
(0.83 s vs 0.84 s, no overlap), so threads gain nothing. Each ciphertext is independent, so a
range of them is the unit of work; this process takes the first range itself and a pool of
`workers - 1` processes the others, and every range runs the same function as a serial call
would, so the bytes a parallel call produces decrypt exactly like a serial call's. Large inputs
and outputs cross in shared memory (`SharedFile`), not through the pool's pipe.

Worker processes start once per process and worker count, load the site key from its file
bytes once, and are shut down at exit. They are forked: `spawn` and `forkserver` run the
parent's main script again in every worker, which breaks any caller whose script is not
guarded by `if __name__ == "__main__"` (measured: a plain script then fails with
BrokenProcessPool). A forked worker runs only SEAL and numpy, never the parent's other threads'
code, and freezes the inherited objects out of the garbage collector so their pages stay
shared. Below `MIN_PARALLEL_CIPHERTEXTS` the pool is not worth its pickling.
"""

import contextlib
import gc
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TypeVar

import numpy as np

from fedhealth.core.crypto.keys import SiteKey

Job = TypeVar("Job")
Result = TypeVar("Result")
Away = TypeVar("Away")
Done = TypeVar("Done")

MIN_PARALLEL_CIPHERTEXTS = 64
"""Ciphertexts below which one process does everything (~40 ms of SEAL work at `default`)."""


def default_workers() -> int:
    """The processes a site's codec uses unless told otherwise: every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CALLER_OVERHEAD = 0.04
"""The calling process's own serial work in a parallel call, as a fraction of the whole call's work
done serially: flattening the update, copying ranges into and out of shared memory, building the
record. Measured at 7M parameters (`default`, 2 processes, CPU time, with the kept
`shared_file`): 0.08 s of 2.8 s to encrypt (0.19 s with a fresh file per call).
`chunk_ranges.split` shortens the caller's range by it, so that the caller does not finish last
while the workers wait idle. Decryption splits equally: there a worker copies its ciphertexts
back out of shared memory, which weighs about what its caller does alone (with the caller's
range 7% shorter the worker took 0.64 s of CPU, the caller 0.51 s)."""


def parallel_available() -> bool:
    """Worker processes need memory files they can map by path (Linux's memfd)."""
    return hasattr(os, "memfd_create")


def here_and_away(key: SiteKey, here: Callable[[SiteKey, Job], Result], job: Job,
                  away: Callable[[SiteKey, Away], Done], jobs: list[Away]
                  ) -> tuple[Result, list[Done]]:
    """here(key, job) in this process while a pool of len(jobs) worker processes runs
    away(key, j) for each of `jobs`.

    `away` must be a module-level function (it is pickled by name) and `jobs` small: big arrays
    travel as `Region`s of a `SharedFile`, not through the pool's pipe. If a worker dies, this
    process runs the jobs itself: slower, never wrong.
    """
    futures: list[Future[Done]] = []
    try:
        try:
            pool = _pool(len(jobs))
            futures = [pool.submit(_run, away, key.raw, j) for j in jobs]
            first = here(key, job)
            return first, [future.result() for future in futures]
        except BrokenProcessPool:  # a worker died (killed, out of memory): the jobs run here,
            _POOLS.pop(len(jobs), None)  # and the next call starts a new pool
            return here(key, job), [away(key, j) for j in jobs]
    finally:
        for future in futures:
            future.cancel()


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: map with every page faulted in by one call instead of one trap per 4 kB page."""


@dataclass(frozen=True)
class Region:
    """Bytes of a `SharedFile`, by path: what a job names instead of carrying the array."""

    path: str
    offset: int
    nbytes: int

    def array(self, dtype: type[np.generic]) -> np.ndarray:
        """The region mapped into this process (read and write), as a flat array of `dtype`."""
        if not self.nbytes:
            return np.zeros(0, dtype=dtype)
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        fd = os.open(self.path, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, self.offset + self.nbytes - start,
                               flags=mmap.MAP_SHARED | _POPULATE, offset=start)
        finally:
            os.close(fd)
        return np.frombuffer(mapped, dtype=np.uint8, count=self.nbytes,
                             offset=self.offset - start).view(dtype)


class SharedFile:
    """An anonymous memory file of `nbytes` that worker processes map through /proc/<pid>/fd.

    Sending a 7M-parameter update's halves through the pool's pipe cost the parent 0.1-0.2 s of
    CPU per 56 MB (pickling and copying), as much as a third of the work it hands off; mapped,
    each byte is written once and read once. Use as a context manager, or through
    `shared_file`, which keeps one per process.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self._fd = os.memfd_create("fedhealth-codec")
        os.ftruncate(self._fd, self.nbytes)
        self._map = mmap.mmap(self._fd, self.nbytes, flags=mmap.MAP_SHARED | _POPULATE)
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"

    def array(self, offset: int, nbytes: int, dtype: type[np.generic]) -> np.ndarray:
        """This process's view of bytes offset..offset+nbytes."""
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=offset).view(dtype)

    def region(self, offset: int, nbytes: int) -> Region:
        return Region(self.path, offset, nbytes)

    def __enter__(self) -> "SharedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still exported: it goes with its last user
            self._map.close()
        os.close(self._fd)


_KEPT: list[SharedFile] = []  # this process's reused file, once a call made one
_KEPT_LOCK = threading.Lock()


@contextlib.contextmanager
def shared_file(nbytes: int) -> Iterator[SharedFile]:
    """A `SharedFile` of at least `nbytes` for one call; views of it are valid until the block
    ends.

    The process keeps the largest one it needed and hands it out again: a fresh file's pages
    are allocated by the kernel as they are first touched, which cost the caller 85-95 ms of
    CPU per 58 MB copied in (a 7M-parameter `default` global's half), against 22 ms into a
    kept one, at the price of that memory staying with the process between calls (8 bytes
    per parameter plus a range of ciphertexts). A call made while another thread holds it
    gets a fresh file of its own.
    """
    if not _KEPT_LOCK.acquire(blocking=False):
        with SharedFile(nbytes) as fresh:
            yield fresh
        return
    try:
        if not _KEPT or _KEPT[0].nbytes < nbytes:
            for old in _KEPT:
                old.close()
            _KEPT[:] = [SharedFile(nbytes)]
        yield _KEPT[0]
    finally:
        _KEPT_LOCK.release()


_POOLS: dict[int, ProcessPoolExecutor] = {}
_KEYS: dict[bytes, SiteKey] = {}  # in a worker: the site keys it was sent, by digest


def worker_pids() -> list[int]:
    """The worker processes started so far (a benchmark reads their CPU time)."""
    return [pid for pool in _POOLS.values() for pid in pool._processes]  # the executor's own map


def _pool(processes: int) -> ProcessPoolExecutor:
    if processes not in _POOLS:  # ProcessPoolExecutor joins its processes at interpreter exit
        _POOLS[processes] = ProcessPoolExecutor(processes, mp_context=get_context("fork"),
                                                initializer=gc.freeze)
    return _POOLS[processes]


def _run(work: Callable[[SiteKey, Away], Done], raw_key: bytes, job: Away) -> Done:
    """In a worker: the key from its file bytes (parsed once per process), then the job."""
    digest = hashlib.sha256(raw_key).digest()
    if digest not in _KEYS:
        _KEYS[digest] = SiteKey.from_bytes(raw_key, "the site key sent to a codec worker")
    return work(_KEYS[digest], job)
