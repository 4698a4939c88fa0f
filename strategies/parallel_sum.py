"""The running sum over worker processes: each adds its own range of ciphertexts, all cores busy.

TenSEAL's bindings never release the GIL (no `gil_scoped_release` in its `binding.cpp`; two
threads parsing and adding measured no faster than one), so threads cannot share the work:
processes can. Each worker holds the sum of one contiguous range of ciphertext indices as a
`RunningSum` over that slice, so the sum itself is split over the workers and never copied
whole into the ServerApp until the round closes. A reply is copied once into shared memory
(a memcpy, faster than the parsing it feeds) and each worker parses and adds its range
straight from there. A reply is still all or nothing: when one worker refuses its range, the
others take theirs back, and the error names the lowest refused ciphertext. The workers run
the same parse, checks and additions as the serial sum, in the same order for every
ciphertext, so the result is the serial sum bit for bit.

Workers are started with `spawn` (a forked child of a process running gRPC threads can hang)
and get the params-only aggregator key, which is all the serial sum has either.
"""

import multiprocessing as mp
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, overload

from flwr.app import ArrayRecord

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey
from fedhealth.core.crypto.chunk_ranges import split
from strategies.ciphertext_sum import RunningSum, check_count, declared_count
from strategies.reply_check import ReplyRejected

Span = tuple[int, int]  # (offset, length) of one ciphertext in the shared buffer


def _worker(key: AggregatorKey, conn: Connection) -> None:
    """Serve one `SumWorkers` pipe: fold or undo into, or serialize, its range of each sum.

    Answers a fold with ("ok", slots per ciphertext of the range) or ("refused", reason).
    """
    sums: dict[int, RunningSum] = {}
    folds: dict[int, int] = {}  # updates in each sum, so an undo knows to drop a first one
    buffer: SharedMemory | None = None
    last = _Blobs(memoryview(b""), [])  # this worker's range of the last reply, for an undo
    conn.send(None)  # started (imports done): the ServerApp waits for this before round 1
    while (command := conn.recv())[0] != "stop":
        name, sum_id, *args = command
        if name == "attach":
            last = _Blobs(memoryview(b""), [])
            if buffer is not None:
                buffer.close()
            buffer = SharedMemory(args[0])  # the ServerApp's to unlink (one resource tracker)
            conn.send(None)
        elif name == "fold":
            spans, first_index, expected = args
            assert buffer is not None and buffer.buf is not None, "copied in before a fold"
            last = _Blobs(buffer.buf, spans)
            running = sums.setdefault(sum_id, RunningSum(key, expected, first_index))
            try:
                running.fold_ciphertexts(last)
            except ReplyRejected as exc:
                conn.send(("refused", str(exc)))
                continue
            folds[sum_id] = folds.get(sum_id, 0) + 1
            conn.send(("ok", running.chunk_sizes))
        elif name == "undo":  # another worker refused its range of the last reply
            folds[sum_id] -= 1
            if folds[sum_id] == 0:
                del sums[sum_id], folds[sum_id]
            else:
                sums[sum_id].take_back(last)
            conn.send(None)
        elif name == "serialize":
            folds.pop(sum_id, None)
            running = sums.pop(sum_id)
            conn.send(running.ciphertexts())
    if buffer is not None:
        buffer.close()


class _Blobs(Sequence[bytes]):
    """Ciphertexts in the shared buffer, each copied out only when it is parsed."""

    def __init__(self, buffer: memoryview, spans: list[Span]) -> None:
        self.buffer = buffer
        self.spans = spans

    def __len__(self) -> int:
        return len(self.spans)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> "_Blobs": ...

    def __getitem__(self, index: int | slice) -> "bytes | _Blobs":
        if isinstance(index, slice):
            return _Blobs(self.buffer, self.spans[index])
        offset, length = self.spans[index]
        return bytes(self.buffer[offset:offset + length])


class SumWorkers:
    """`processes` workers and the shared buffer replies are copied into; a context manager.

    One pool serves every `ParallelSum` of a strategy (round 1 may hold one per layout).
    """

    def __init__(self, key: AggregatorKey, processes: int) -> None:
        if processes < 2:
            raise ValueError(f"aggregator workers must be at least 2, got {processes}: with "
                             "one, fold serially (strategies.ciphertext_sum.RunningSum)")
        self.key = key
        context = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(key, theirs), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        for pipe in self.pipes:
            pipe.recv()
        self.buffer: SharedMemory | None = None
        self._next_id = 0

    def __enter__(self) -> "SumWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_sum(self, expected_sizes: tuple[int, ...] | None) -> "ParallelSum":
        self._next_id += 1
        return ParallelSum(self, self._next_id, expected_sizes)

    def copy_in(self, blobs: Sequence[bytes]) -> list[Span]:
        """Copy a reply's ciphertexts into the shared buffer (grown to fit); their spans."""
        needed = sum(len(b) for b in blobs)
        if self.buffer is None or self.buffer.size < needed:
            self._release_buffer()
            self.buffer = SharedMemory(create=True, size=needed)
            self.ask_all([("attach", 0, self.buffer.name)] * len(self.pipes))
        view = self.buffer.buf
        assert view is not None, "a SharedMemory we created is mapped"
        spans, offset = [], 0
        for blob in blobs:
            view[offset:offset + len(blob)] = blob
            spans.append((offset, len(blob)))
            offset += len(blob)
        return spans

    def ask_all(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send command i to worker i (the first len(commands) workers), all at once; their
        answers in worker order."""
        answers = self.ask_some(dict(enumerate(commands)))
        return [answers[i] for i in sorted(answers)]

    def ask_some(self, commands: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
        """Send each worker its command, all at once, and wait for all their answers."""
        for worker, command in commands.items():
            self.pipes[worker].send(command)
        return {worker: self.pipes[worker].recv() for worker in commands}

    def close(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                pipe.send(("stop",))
            process.join(timeout=10)
            pipe.close()
        self.pipes, self.processes = [], []
        self._release_buffer()

    def _release_buffer(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer.unlink()
            self.buffer = None


class ParallelSum:
    """An `UpdateSum` whose ciphertexts are split over the workers of `SumWorkers` by range."""

    def __init__(self, workers: SumWorkers, sum_id: int,
                 expected_sizes: tuple[int, ...] | None) -> None:
        self.workers = workers
        self.sum_id = sum_id
        self.expected_sizes = expected_sizes
        self.ranges: list[range] = []  # each worker's ciphertext indices, fixed by the first fold
        self.chunk_sizes: tuple[int, ...] = ()

    def fold(self, record: ArrayRecord) -> None:
        """Add one update across the workers, all of it or none (see module)."""
        count = declared_count(self.workers.key, record)
        check_count(count, self.chunk_sizes or self.expected_sizes)
        ranges = self.ranges or split(count, len(self.workers.pipes))
        spans = self.workers.copy_in(wire.record_to_ciphertexts(record))
        answers = self.workers.ask_all([
            ("fold", self.sum_id, spans[r.start:r.stop], r.start,
             self.expected_sizes[r.start:r.stop] if self.expected_sizes else None)
            for r in ranges])
        refused = [(r.start, answer) for r, (status, answer) in zip(ranges, answers, strict=True)
                   if status == "refused"]
        if refused:
            self.workers.ask_some({i: ("undo", self.sum_id)
                                   for i, (status, _) in enumerate(answers) if status == "ok"})
            raise ReplyRejected(min(refused)[1])
        if not self.ranges:
            self.ranges = ranges
            self.chunk_sizes = tuple(size for _, sizes in answers for size in sizes)

    def ciphertexts(self) -> list[bytes]:
        """The sum serialized, collected in ciphertext order (and dropped by the workers)."""
        parts = self.workers.ask_some({i: ("serialize", self.sum_id)
                                       for i in range(len(self.ranges))})
        return [blob for i in sorted(parts) for blob in parts[i]]
