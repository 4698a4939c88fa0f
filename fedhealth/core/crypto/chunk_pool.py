"""Site-side CKKS work spread over processes, a range of ciphertexts each.

Why processes. TenSEAL's `sealapi` bindings hold the GIL while SEAL encodes, encrypts and
decrypts: two threads encrypting 1000 ciphertexts used exactly as much CPU time as wall time
(0.83 s vs 0.84 s, no overlap), so threads gain nothing. Each ciphertext is independent, so a
range of them is the unit of work; this process takes the first range itself and a pool of
`workers - 1` processes the others, and every range runs the same function as a serial call
would, so the bytes a parallel call produces decrypt exactly like a serial call's.

Worker processes start once per process and worker count, load the site key from its file
bytes once, and are shut down at exit. They are forked: `spawn` and `forkserver` run the
parent's main script again in every worker, which breaks any caller whose script is not
guarded by `if __name__ == "__main__"` (measured: a plain script then fails with
BrokenProcessPool). A forked worker runs only SEAL and numpy, never the parent's other threads'
code, and freezes the inherited objects out of the garbage collector so their pages stay
shared. Below `MIN_PARALLEL_CIPHERTEXTS` the pool is not worth its pickling.
"""

import gc
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from typing import TypeVar

from fedhealth.core.crypto.keys import SiteKey

Job = TypeVar("Job")
Result = TypeVar("Result")

MIN_PARALLEL_CIPHERTEXTS = 64
"""Ciphertexts below which one process does everything (~40 ms of SEAL work at `default`)."""


def default_workers() -> int:
    """The processes a site's codec uses unless told otherwise: every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split(count: int, parts: int) -> list[range]:
    """`count` ciphertext indices in `parts` contiguous ranges of near-equal length (none empty)."""
    parts = max(1, min(parts, count))
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in pairwise(bounds)]


def map_ranges(work: Callable[[SiteKey, Job], Result], key: SiteKey, jobs: Sequence[Job],
               workers: int) -> list[Result]:
    """[work(key, job) for job in jobs], the first job here and the rest in the pool.

    `work` must be a module-level function (it is pickled by name) and `jobs` picklable.
    """
    if len(jobs) <= 1 or workers <= 1:
        return [work(key, job) for job in jobs]
    pool = _pool(workers - 1)
    futures: list[Future[Result]] = [pool.submit(_run, work, key.raw, job) for job in jobs[1:]]
    try:
        first = work(key, jobs[0])
        return [first, *(future.result() for future in futures)]
    finally:
        for future in futures:
            future.cancel()


_POOLS: dict[int, ProcessPoolExecutor] = {}
_KEYS: dict[bytes, SiteKey] = {}  # in a worker: the site keys it was sent, by digest


def _pool(processes: int) -> ProcessPoolExecutor:
    if processes not in _POOLS:  # ProcessPoolExecutor joins its processes at interpreter exit
        _POOLS[processes] = ProcessPoolExecutor(processes, mp_context=get_context("fork"),
                                                initializer=gc.freeze)
    return _POOLS[processes]


def _run(work: Callable[[SiteKey, Job], Result], raw_key: bytes, job: Job) -> Result:
    """In a worker: the key from its file bytes (parsed once per process), then the job."""
    digest = hashlib.sha256(raw_key).digest()
    if digest not in _KEYS:
        _KEYS[digest] = SiteKey.from_bytes(raw_key, "the site key sent to a codec worker")
    return work(_KEYS[digest], job)
