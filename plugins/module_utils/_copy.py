# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Extent-aware parallel copy between two endpoints.

An endpoint is anything with a size, extents and random access I/O: an image
served by qemu-nbd, an NBD export elsewhere, a local image file (_file), or
an imageio ticket (_imageio). The copy reads the source extent map in
bounded steps, so an 8 TiB image never has its whole map in memory, and
hands out work items to N workers. Each worker owns its own pair of
connections (``clone()``), so no connection is ever shared between threads.

Zero extents are skipped when the destination is known to read as zeros (a
new disk or image) and zeroed otherwise; data extents are split into requests
of at most ``request_size`` bytes.

Endpoint interface (NbdEndpoint is the model): ``size``, ``is_zero``,
``max_connections``, ``max_request``, ``clone()``, ``extents(offset,
length)``, ``readinto(offset, buf)``, ``write(offset, buf)``, ``zero(offset,
length)``, ``flush()``, ``close()``. Optional members let data skip the
copy's buffer: a source's ``file_range(offset, length)`` gives ``(fd, file
offset)`` where a range lies in one piece of a local file (or None), and a
destination whose ``can_write_from_file`` is true takes it with
``write_from_file(offset, fd, file_offset, length)``. A source's
``forwarder(dst)`` may give a function that copies a range to dst without
the data entering this process (NBD to NBD over plain sockets).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections import namedtuple

from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import GiB, MiB, aligned_buffer

# Large zero requests make the server busy for a long time; smaller ones let
# progress and cancellation be seen.
MAX_ZERO = GiB

DEFAULT_REQUEST_SIZE = 8 * MiB

DEFAULT_WORKERS = 4

# Connections a copy forwarding data from NBD to NBD uses at most: moving
# the data costs this process next to nothing, two connections keep both
# servers busy, and more add only the servers' own overhead (bench/run.py copy).
FORWARD_WORKERS = 2

# Buffers a worker reads into ahead of its writes: one being written while
# the other is read. Each is a request (8 MiB): memory stays flat.
READ_AHEAD = 2


class Extent(namedtuple("Extent", "start length zero hole")):
    """A range of an image.

    zero: the range reads as zeros.
    hole: the range is not allocated in the image (or its whole chain), so
        a format that supports it may leave it unallocated.
    """

    __slots__ = ()

    @property
    def end(self):
        return self.start + self.length


class CopyError(Exception):
    """The copy could not be done; the message says why."""


class Stats:
    """What a copy did, updated while it runs."""

    def __init__(self, size):
        self.size = size
        self.done = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.start = time.monotonic()
        self.seconds = 0.0
        self.connections = 0
        self._lock = threading.Lock()

    def add(self, length, zero):
        with self._lock:
            self.done += length
            if zero:
                self.zero_bytes += length
            else:
                self.data_bytes += length

    def as_dict(self):
        seconds = self.seconds or (time.monotonic() - self.start)
        return {
            "bytes": self.size,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "seconds": round(seconds, 3),
            "rate": int(self.done / seconds) if seconds > 0 else 0,
            "connections": self.connections,
        }


def copy(
    src,
    dst,
    workers=DEFAULT_WORKERS,
    request_size=DEFAULT_REQUEST_SIZE,
    progress=None,
    zero_destination=None,
):
    """Copy every byte of src to dst; return Stats.

    src, dst: endpoints (NbdEndpoint or any object of the same shape). They
        stay owned by the caller; the copy opens and closes its own clones.
    workers: connections per side, bounded by what both endpoints allow.
    progress: called with the Stats object after each request.
    zero_destination: whether zero extents must be written; by default only
        when the destination is not known to read as zeros.
    """
    if dst.size < src.size:
        raise CopyError(
            f"the image needs {src.size} bytes but the destination holds only {dst.size} bytes"
        )
    if zero_destination is None:
        zero_destination = not dst.is_zero
    request_size = min(request_size, src.max_request, dst.max_request)
    workers = max(1, min(workers, src.max_connections, dst.max_connections))
    forwarder = getattr(src, "forwarder", None)
    if forwarder is not None and forwarder(dst) is not None:
        workers = min(workers, FORWARD_WORKERS)

    stats = Stats(src.size)
    stats.connections = workers
    # The caller's source connection reads the extent map; every worker reads
    # data on a connection of its own.
    items = _WorkItems(src.extents(), request_size)
    failed = threading.Event()
    errors = []

    def run(worker_src, worker_dst):
        try:
            _work(worker_src, worker_dst, items, zero_destination, stats, progress, failed)
            worker_dst.flush()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            failed.set()

    pairs = []
    threads = []
    try:
        for i in range(workers):
            pairs.append((src.clone(), dst if i == 0 else dst.clone()))
        for worker_src, worker_dst in pairs[1:]:
            t = threading.Thread(target=run, args=(worker_src, worker_dst), daemon=True)
            t.start()
            threads.append(t)
        run(*pairs[0])
    except BaseException:
        failed.set()
        raise
    finally:
        for t in threads:
            t.join()
        for i, (worker_src, worker_dst) in enumerate(pairs):
            worker_src.close()
            if i > 0:
                worker_dst.close()
    if errors:
        raise errors[0]
    stats.seconds = time.monotonic() - stats.start
    return stats


class _WorkItems:
    """Hands out (offset, length, zero) requests from a lazy extent stream.

    Shared by the workers; the lock keeps one reader of the extent iterator
    at a time, so only one step of the map is ever in memory.
    """

    def __init__(self, extents, request_size):
        self._extents = extents
        self.request_size = request_size
        self._lock = threading.Lock()
        self._current = None

    def next(self):
        with self._lock:
            while self._current is None or self._current.length == 0:
                self._current = next(self._extents, None)
                if self._current is None:
                    return None
            ext = self._current
            limit = MAX_ZERO if ext.zero else self.request_size
            length = min(ext.length, limit)
            self._current = Extent(ext.start + length, ext.length - length, ext.zero, ext.hole)
            return ext.start, length, ext.zero


def _work(src, dst, items, zero_destination, stats, progress, failed):
    forward = getattr(src, "forwarder", None)
    forward = forward(dst) if forward is not None else None
    if forward is not None:
        _forward(forward, dst, items, zero_destination, stats, progress, failed)
        return
    # Data goes from the source's file straight to the destination when both
    # can (a local file to imageio's unix socket): no copy in this process.
    file_range = None
    if getattr(dst, "can_write_from_file", False):
        file_range = getattr(src, "file_range", None)
    if file_range is not None:
        view = None
        while not failed.is_set():
            item = items.next()
            if item is None:
                return
            offset, length, zero = item
            where = None if zero else file_range(offset, length)
            if where is not None:
                dst.write_from_file(offset, where[0], where[1], length)
            elif zero:
                if zero_destination:
                    dst.zero(offset, length)
            else:
                if view is None:
                    view = aligned_buffer(items.request_size)
                src.readinto(offset, view[:length])
                dst.write(offset, view[:length])
            _done(stats, progress, length, zero)
        return
    with _ReadAhead(src, items, failed) as reads:
        for offset, length, zero, buf in reads:
            if zero:
                if zero_destination:
                    dst.zero(offset, length)
            else:
                dst.write(offset, buf[:length])
                reads.release(buf)
            _done(stats, progress, length, zero)


def _forward(forward, dst, items, zero_destination, stats, progress, failed):
    """Copy the items with forward(offset, length), which sends a copy and
    returns a function waiting for it, READ_AHEAD + 1 items in flight."""
    pending = collections.deque()
    while not failed.is_set():
        item = items.next()
        if item is None:
            break
        offset, length, zero = item
        if zero:
            if zero_destination:
                dst.zero(offset, length)
            _done(stats, progress, length, zero)
            continue
        pending.append((length, forward(offset, length)))
        if len(pending) > READ_AHEAD:
            _finish(pending.popleft(), stats, progress)
    while pending:
        _finish(pending.popleft(), stats, progress)


def _finish(sent, stats, progress):
    length, wait = sent
    wait()
    _done(stats, progress, length, False)


def _done(stats, progress, length, zero):
    stats.add(length, zero)
    if progress is not None:
        progress(stats)


class _ReadAhead:
    """Reads a worker's items in a thread of its own, into READ_AHEAD
    buffers, ahead of the writes: reading overlaps sending, and memory stays
    bounded. A source with ``submit_readinto(offset, buf)`` (returning a
    function that waits for the data) has every free buffer's read in flight
    at once. Iterating yields (offset, length, zero, buffer); release() gives
    a buffer back once written."""

    def __init__(self, src, items, failed):
        self._src = src
        self._items = items
        self._failed = failed
        self._free = queue.Queue()
        for _slot in range(READ_AHEAD):
            self._free.put(aligned_buffer(items.request_size))
        self._ready = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            got = self._ready.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def release(self, buf):
        self._free.put(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # A None buffer stops the reader once its reads in flight are done.
        self._free.put(None)
        self._thread.join()

    def _read(self):
        inflight = collections.deque()
        try:
            more = True
            while more or inflight:
                more = more and self._submit(inflight)
                if inflight:
                    offset, length, zero, buf, finish = inflight.popleft()
                    if finish is not None:
                        finish()
                    self._ready.put((offset, length, zero, buf))
        except BaseException as e:  # raised in the writing thread
            self._ready.put(e)
            return
        self._ready.put(None)

    def _submit(self, inflight):
        """Start reading items into the free buffers (waiting for one only
        when nothing is in flight); False once there is nothing more to read."""
        submit = getattr(self._src, "submit_readinto", None)
        while not self._failed.is_set():
            try:
                buf = self._free.get(block=not inflight)
            except queue.Empty:
                return True
            if buf is None:
                return False
            item = self._items.next()
            if item is None:
                self._free.put(buf)
                return False
            offset, length, zero = item
            finish = None
            if zero:
                self._free.put(buf)
                buf = None
            elif submit is not None:
                finish = submit(offset, buf[:length])
            else:
                self._src.readinto(offset, buf[:length])
            inflight.append((offset, length, zero, buf, finish))
        return False
