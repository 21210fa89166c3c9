# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The qcow2 format: a new image written in place (Qcow2Writer), and the
size an image takes as qcow2 (measure).

qcow2 format: https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _file
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import byte_view, round_up

# qcow2 version 3 header (qcow2.txt, "Header"), big-endian; an image made
# here has no backing file, no encryption, no snapshots and no feature bits.
#   magic, version, backing_file_offset, backing_file_size, cluster_bits,
#   size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
#   refcount_table_clusters, nb_snapshots, snapshots_offset,
#   incompatible_features, compatible_features, autoclear_features,
#   refcount_order, header_length
QCOW2_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_VERSION = 3
# Header extension: type, length; type 0 ends the list ("Header extensions").
QCOW2_EXTENSION = struct.Struct(">II")
QCOW2_EXTENSION_END = 0

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
# qemu counts a qcow2 image's size in 512 byte sectors.
SECTOR_SIZE = 512

# L1 and L2 entries ("Cluster mapping"): 64 bit, the host offset in bits
# 9-55; bit 63 says the cluster's refcount is exactly one.
QCOW_OFLAG_COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_SIZE = 8
L2_ENTRIES = CLUSTER_SIZE // ENTRY_SIZE
L2_COVERAGE = L2_ENTRIES * CLUSTER_SIZE

# 16 bit refcounts (refcount_order 4), big-endian ("Host cluster management").
REFCOUNT_ORDER = 4
REFCOUNT_ONE = b"\x00\x01"
REFCOUNTS_PER_BLOCK = CLUSTER_SIZE // len(REFCOUNT_ONE)


# array("Q") holds native 64 bit integers; qcow2 stores them big-endian.
_SWAP = sys.byteorder == "little"


def measure(size, extents):
    """What ``qemu-img measure -O qcow2`` gives for an image of size bytes
    with these extents (_copy.Extent, in order): {"required",
    "fully_allocated"} in bytes, for qemu's defaults (64 KiB clusters, 16 bit
    refcounts).

    Computed as qemu computes it (qcow2_measure in block/qcow2.c): the
    metadata of a fully allocated image, plus every cluster holding some
    range that does not read as zeros.
    """
    aligned = round_up(size, CLUSTER_SIZE)
    fully_allocated = _metadata_size(aligned) + aligned
    data = 0
    counted = 0
    for extent in extents:
        if extent.zero:
            continue
        start = max(extent.start - extent.start % CLUSTER_SIZE, counted)
        end = round_up(extent.end, CLUSTER_SIZE)
        if end > start:
            data += end - start
            counted = end
    return {"required": fully_allocated - aligned + data, "fully_allocated": fully_allocated}


def _metadata_size(aligned_size):
    """The header, L1 and L2 tables and refcounts of an image of this many
    bytes (a multiple of the cluster size), every cluster allocated."""
    l2_entries = round_up(aligned_size // CLUSTER_SIZE, L2_ENTRIES)
    l1_entries = round_up(l2_entries * ENTRY_SIZE // CLUSTER_SIZE, L2_ENTRIES)
    size = CLUSTER_SIZE + (l2_entries + l1_entries) * ENTRY_SIZE
    clusters = (size + aligned_size) // CLUSTER_SIZE
    # Refcount blocks and table clusters count themselves too: grow them
    # until they cover everything.
    blocks = table = total = 0
    while True:
        last = total
        blocks = -(-(clusters + table + blocks) // REFCOUNTS_PER_BLOCK)
        table = -(-blocks * ENTRY_SIZE // CLUSTER_SIZE)
        total = clusters + blocks + table
        if total == last:
            return size + (blocks + table) * CLUSTER_SIZE


class Qcow2Writer:
    """A new qcow2 image written in place, as a copy destination.

    Data clusters are allocated in the order writes come and written straight
    to the file; each L2 table is updated in the file as its clusters are
    allocated. The L1 table, the refcounts and the header are written by
    flush(), so the image is whole after every flush, and close() flushes
    what changed since. Only the L1 table is kept in memory.

    Layout, in clusters of 64 KiB:

        0       header
        1...    refcount table, sized for the largest file the image can need
        ...     L1 table
        ...     refcount block 0
        ...     data clusters and L2 tables, as they are allocated; the first
                cluster of every later 2 GiB of the file (32768 clusters) is
                the refcount block covering that range

    Every cluster up to the end of the file is used exactly once, so every
    refcount is one and every refcount block is written the same way.
    """

    def __init__(self, path, size, _state=None):
        if _state is None:
            file = _file.File.open(path, writable=True, create=True)
            _state = _Qcow2State(file, size)
        self._state = _state
        self.path = path
        self.size = _state.size
        self.is_zero = True
        self.max_connections = _file.MAX_CONNECTIONS
        self.max_request = _file.MAX_REQUEST

    def clone(self):
        self._state.file.acquire()
        return Qcow2Writer(self.path, self.size, _state=self._state)

    def extents(self, offset=0, length=None):
        end = self.size if length is None else min(offset + length, self.size)
        pending = None
        while offset < end:
            step_end = min(end, (offset // L2_COVERAGE + 1) * L2_COVERAGE)
            for start, length_, host in self._mapped(offset, step_end - offset, False):
                zero = host is None
                if pending is not None and pending.zero == zero:
                    pending = _copy.Extent(pending.start, pending.length + length_, zero, zero)
                else:
                    if pending is not None:
                        yield pending
                    pending = _copy.Extent(start, length_, zero, zero)
            offset = step_end
        if pending is not None:
            yield pending

    def readinto(self, offset, buf):
        view = byte_view(buf)
        _file.check_range("read", offset, len(view), self.size)
        pos = 0
        for start, length, host in self._mapped(offset, len(view), False):
            part = view[pos : pos + length]
            if host is None:
                _file.fill_zeros(part)
            else:
                try:
                    n = self._state.file.read(host, part)
                except OSError as e:
                    raise _file.FileError(
                        f"cannot read image '{self.path}' at offset {start}: {e.strerror}"
                    ) from None
                # A cluster written only in part ends in a hole, or at the
                # end of the file.
                _file.fill_zeros(part[n:])
            pos += length

    def write(self, offset, buf):
        view = byte_view(buf)
        _file.check_range("write", offset, len(view), self.size)
        pos = 0
        for start, length, host in self._mapped(offset, len(view), True):
            try:
                self._state.file.write(host, view[pos : pos + length])
            except OSError as e:
                raise _file.FileError(
                    f"cannot write image '{self.path}' at offset {start}: {e.strerror}"
                ) from None
            pos += length

    def zero(self, offset, length):
        """Clusters never written read as zeros already; written ones get zeros."""
        _file.check_range("zero", offset, length, self.size)
        for start, length_, host in self._mapped(offset, length, False):
            if host is not None:
                try:
                    _file.write_zeros(self._state.file, host, length_)
                except OSError as e:
                    raise _file.FileError(
                        f"cannot zero image '{self.path}' at offset {start}: {e.strerror}"
                    ) from None

    def flush(self):
        try:
            self._state.flush()
        except OSError as e:
            raise _file.FileError(f"cannot flush image '{self.path}': {e.strerror}") from None

    def close(self):
        state, self._state = self._state, None
        if state is None:
            return
        try:
            if state.file.users == 1:
                state.flush()
        except OSError as e:
            raise _file.FileError(f"cannot flush image '{self.path}': {e.strerror}") from None
        finally:
            state.file.release()

    def __repr__(self):
        return f"<Qcow2Writer {self.path!r}>"

    def _mapped(self, offset, length, allocate):
        try:
            return self._state.map(offset, length, allocate)
        except OSError as e:
            raise _file.FileError(
                f"cannot update the metadata of image '{self.path}': {e.strerror}"
            ) from None


class _Qcow2State:
    """What the clones of a Qcow2Writer share: the file, the allocation and the L1 table."""

    def __init__(self, file, size):
        self.file = file
        self.size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
        self.l1_size = -(-self.size // L2_COVERAGE)
        l1_clusters = max(1, -(-self.l1_size * ENTRY_SIZE // CLUSTER_SIZE))
        data_clusters = -(-self.size // CLUSTER_SIZE)
        # The refcount table cannot move, so it gets room for the largest
        # file the image can grow to: every data cluster, every L2 table and
        # the refcount blocks covering them all (which count themselves).
        blocks = reftable_clusters = 1
        while True:
            clusters = 1 + reftable_clusters + l1_clusters + self.l1_size + data_clusters + blocks
            need_blocks = -(-clusters // REFCOUNTS_PER_BLOCK)
            need_table = -(-need_blocks * ENTRY_SIZE // CLUSTER_SIZE)
            if need_blocks <= blocks and need_table <= reftable_clusters:
                break
            blocks = max(blocks, need_blocks)
            reftable_clusters = max(reftable_clusters, need_table)
        self.reftable_clusters = reftable_clusters
        self.reftable_offset = CLUSTER_SIZE
        self.l1_offset = (1 + reftable_clusters) * CLUSTER_SIZE
        first_block = 1 + reftable_clusters + l1_clusters
        self.refblocks = [first_block]
        self.next_cluster = first_block + 1
        self.l1 = array("Q", bytes(self.l1_size * ENTRY_SIZE))
        self.lock = threading.Lock()
        # What flush() must write: refcount blocks by index, the table of
        # them, the L1 table and the header.
        self._dirty_blocks = {0}
        self._table_dirty = True
        self._l1_dirty = True
        self._header_written = False

    def map(self, offset, length, allocate):
        """[(guest offset, length, host offset or None)] covering the range.

        With allocate, clusters not yet allocated are, and their L2 entries
        written; without, they come back as None (they read as zeros).
        """
        pieces = []
        end = offset + length
        with self.lock:
            while offset < end:
                l1_index = offset // L2_COVERAGE
                table_end = min(end, (l1_index + 1) * L2_COVERAGE)
                self._map_table(l1_index, offset, table_end, allocate, pieces)
                offset = table_end
        return pieces

    def flush(self):
        with self.lock:
            file = self.file
            if self._dirty_blocks:
                for index in sorted(self._dirty_blocks):
                    first = index * REFCOUNTS_PER_BLOCK
                    count = min(self.next_cluster, first + REFCOUNTS_PER_BLOCK) - first
                    file.write_metadata(self.refblocks[index] * CLUSTER_SIZE, REFCOUNT_ONE * count)
                self._dirty_blocks.clear()
            if self._table_dirty:
                table = array("Q", (c * CLUSTER_SIZE for c in self.refblocks))
                file.write_metadata(self.reftable_offset, _to_disk(table))
                self._table_dirty = False
            if self._l1_dirty:
                if self.l1_size:
                    file.write_metadata(self.l1_offset, _to_disk(self.l1))
                self._l1_dirty = False
            # Every allocated cluster is inside the file, even one written
            # only in part.
            end = self.next_cluster * CLUSTER_SIZE
            if file.size() < end:
                os.ftruncate(file.fd, end)
            if not self._header_written:
                file.write_metadata(0, self._header())
                self._header_written = True
            file.sync()

    def _header(self):
        header = QCOW2_HEADER.pack(
            QCOW2_MAGIC,
            QCOW2_VERSION,
            0,
            0,
            CLUSTER_BITS,
            self.size,
            0,
            self.l1_size,
            self.l1_offset,
            self.reftable_offset,
            self.reftable_clusters,
            0,
            0,
            0,
            0,
            0,
            REFCOUNT_ORDER,
            QCOW2_HEADER.size,
        )
        return header + QCOW2_EXTENSION.pack(QCOW2_EXTENSION_END, 0)

    def _map_table(self, l1_index, offset, end, allocate, pieces):
        """Map [offset, end), which lies under one L2 table."""
        first = offset // CLUSTER_SIZE
        last = (end - 1) // CLUSTER_SIZE
        base = l1_index * L2_ENTRIES
        table = self.l1[l1_index] & OFFSET_MASK
        if not table and not allocate:
            pieces.append((offset, end - offset, None))
            return
        count = last - first + 1
        slot = (first - base) * ENTRY_SIZE
        if table:
            entries = _read_entries(self.file, table + slot, count * ENTRY_SIZE)
        else:
            table = self._allocate_one() * CLUSTER_SIZE
            self.l1[l1_index] = table | QCOW_OFLAG_COPIED
            self._l1_dirty = True
            entries = array("Q", bytes(count * ENTRY_SIZE))
        changed = False
        i = 0
        while i < count:
            host = entries[i] & OFFSET_MASK
            j = i + 1
            if host:
                while j < count and entries[j] & OFFSET_MASK == host + (j - i) * CLUSTER_SIZE:
                    j += 1
                runs = [(i, j - i, host // CLUSTER_SIZE)]
            else:
                while j < count and not entries[j] & OFFSET_MASK:
                    j += 1
                if allocate:
                    runs = []
                    k = i
                    for cluster, n in self._allocate(j - i):
                        for m in range(n):
                            entries[k + m] = (cluster + m) * CLUSTER_SIZE | QCOW_OFLAG_COPIED
                        runs.append((k, n, cluster))
                        k += n
                    changed = True
                else:
                    runs = [(i, j - i, None)]
            for k, n, cluster in runs:
                start = max(offset, (first + k) * CLUSTER_SIZE)
                stop = min(end, (first + k + n) * CLUSTER_SIZE)
                host_offset = None
                if cluster is not None:
                    host_offset = cluster * CLUSTER_SIZE + start - (first + k) * CLUSTER_SIZE
                pieces.append((start, stop - start, host_offset))
            i = j
        if changed:
            self.file.write_metadata(table + slot, _to_disk(entries))

    def _allocate_one(self):
        ((cluster, _count),) = self._allocate(1)
        return cluster

    def _allocate(self, count):
        """Take count clusters from the end of the file: [(first, n)], split
        around the refcount blocks it places on the way."""
        runs = []
        while count:
            cluster = self.next_cluster
            index, position = divmod(cluster, REFCOUNTS_PER_BLOCK)
            if position == 0:
                self.refblocks.append(cluster)
                self._table_dirty = True
                self._dirty_blocks.add(index)
                self.next_cluster += 1
                continue
            n = min(count, REFCOUNTS_PER_BLOCK - position)
            runs.append((cluster, n))
            self._dirty_blocks.add(index)
            self.next_cluster += n
            count -= n
        return runs


def _read_entries(file, offset, length):
    """An array("Q") of the big-endian entries at offset; zeros past the end."""
    entries = array("Q", file.read_metadata(offset, length))
    if _SWAP:
        entries.byteswap()
    return entries


def _to_disk(entries):
    """The bytes of an array("Q") as qcow2 stores them (big-endian)."""
    if _SWAP:
        entries = array("Q", entries)
        entries.byteswap()
    return entries.tobytes()
