# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Local image files as copy endpoints, read and written without qemu-nbd.

Serving a local image with qemu-nbd costs a process, and every byte crosses
a unix socket twice. When the guest data lies plainly in the file, the copy
reads and writes the file itself:

- FileReader reads a raw file, or a qcow2 file whose data clusters all lie
  uncompressed in the file itself: ``qemu-img map`` tells where each data
  range is in the file. Anything else (compressed clusters, data from a
  backing file, an external data file, encryption, a map too large to keep)
  is left to qemu-nbd: open_reader() returns None then.
- RawWriter and Qcow2Writer write a new image: data goes straight to its
  place in the file, and Qcow2Writer keeps the qcow2 metadata (L1 and L2
  tables, refcounts) itself.

Reads and writes use direct I/O where offsets and lengths allow, as qemu-nbd
does with ``--cache=none`` (what imageio and vdsm run): writing through the
page cache costs several times the CPU of the copy itself, and copying from
it a sixth of a TLS upload's. Only unaligned pieces (the end of an image
whose size is not a multiple of 4 KiB) go through the page cache.

qcow2 format: https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
import threading
from array import array
from contextlib import closing

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _qemu

KiB = 1024
MiB = 1024**2

# Direct I/O needs offsets, lengths and buffer addresses aligned to the
# device's logical block size; 4 KiB suits every common device.
DIRECT_ALIGNMENT = 4 * KiB

# Threads reading or writing one file at a time.
MAX_CONNECTIONS = 8
MAX_REQUEST = 32 * MiB

# Kept in memory as about 20 bytes a range; a qcow2 image more fragmented
# than this is served by qemu-nbd, whose memory does not grow with the map.
MAX_MAP_EXTENTS = 256 * 1024

# Zeros for filling buffers and zeroing written ranges.
ZERO_CHUNK = 1 * MiB

FORMATS = ("raw", "qcow2")

# qemu's image locking (block/file-posix.c, raw_apply_lock_bytes): a reader
# holds a shared lock on byte 100 + bit for each permission it uses, and on
# byte 200 + bit for each permission it denies others. A qemu process that
# wants to write or resize the image finds our byte 201 or 203 locked and
# refuses, as it does for qemu-nbd --read-only.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_RESIZE = 3
READER_LOCK_BYTES = (
    LOCK_PERM_BASE + PERM_CONSISTENT_READ,
    LOCK_SHARED_BASE + PERM_WRITE,
    LOCK_SHARED_BASE + PERM_RESIZE,
)

# fallocate(2) modes for zeroing a raw image.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

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

# preadv2(2) flag: fail with EAGAIN instead of waiting for the storage
# (Linux 4.14, Python 3.7).
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class FileError(_copy.CopyError):
    """A local image file could not be read or written; the message says which and why."""


def open_reader(image, fmt=None, page_cache=True):
    """Return a FileReader of a local image, or None when qemu-nbd must read it.

    fmt: the image format, probed when None. Raises _qemu.QemuError for
    images qemu cannot read, as serving them with qemu-nbd would.
    page_cache: copy what the page cache holds of the image from it (see
    _File.read); when False, read everything with direct I/O.
    """
    if _qemu.is_nbd_url(image) or not _is_image_file(image):
        return None
    try:
        file = _File.open(image)
    except FileError:
        # qemu-img tells why, as it does for every image it cannot open.
        return None
    file.page_cache = page_cache
    reader = None
    try:
        # Locked before qemu-img looks at the image, so nobody starts
        # writing it between the look and the copy.
        file.lock_shared()
        info = _qemu.info(image, fmt=fmt)
        fmt = info["format"]
        size = info["virtual-size"]
        if fmt == "raw":
            reader = FileReader(file, size)
        elif fmt == "qcow2" and _plain_qcow2(info):
            _qemu.check(image, fmt="qcow2")
            extent_map = _load_map(image, size)
            if extent_map is not None:
                reader = FileReader(file, size, extent_map)
        return reader
    finally:
        if reader is None:
            file.release()


def create_writer(path, fmt, size):
    """Create a new image at path (replacing any file there); return its writer.

    fmt: "raw" or "qcow2". The image reads as zeros until written.
    """
    if fmt == "raw":
        return RawWriter(path, size)
    if fmt == "qcow2":
        return Qcow2Writer(path, size)
    raise ValueError(f"cannot write {fmt} images directly; use one of {', '.join(FORMATS)}")


class FileReader:
    """A local raw or qcow2 image read from its file, as a copy source.

    Has the shape of _copy.NbdEndpoint, plus file_range(): where a guest
    range lies in the file, so a destination may send it from there.
    """

    def __init__(self, file, size, extent_map=None):
        self._file = file
        self._map = extent_map
        self.path = file.path
        self.size = size
        self.is_zero = False
        self.max_connections = MAX_CONNECTIONS
        self.max_request = MAX_REQUEST

    @property
    def format(self):
        return "raw" if self._map is None else "qcow2"

    def clone(self):
        self._file.acquire()
        return FileReader(self._file, self.size, self._map)

    def extents(self, offset=0, length=None):
        """Yield _copy.Extent covering [offset, offset + length), in order."""
        end = self.size if length is None else min(offset + length, self.size)
        if self._map is None:
            ranges = self._file.raw_extents(offset, end)
        else:
            ranges = self._map.ranges(offset, end)
        for start, length_, zero, hole in ranges:
            yield _copy.Extent(start, length_, zero, hole)

    def readinto(self, offset, buf):
        """Fill buf with the guest bytes at offset."""
        view = _byte_view(buf)
        _check_range("read", offset, len(view), self.size)
        if self._map is None:
            self._read(offset, view, offset, past_end_zeros=True)
            return
        pos = 0
        for start, length, file_offset in self._map.pieces(offset, offset + len(view)):
            part = view[pos : pos + length]
            if file_offset is None:
                _fill_zeros(part)
            else:
                self._read(start, part, file_offset, past_end_zeros=False)
            pos += length

    def file_range(self, offset, length):
        """(fd, file offset) where the guest range lies in one piece of the
        file, or None when it does not (zeros, several pieces, past the end
        of a raw file)."""
        if self._map is None:
            if offset + length > self._file.size():
                return None
            return self._file.fd, offset
        found = self._map.data_at(offset, length)
        if found is None:
            return None
        return self._file.fd, found

    def close(self):
        if self._file is not None:
            self._file.release()
            self._file = None

    def __repr__(self):
        return f"<FileReader {self.format} {self.path!r}>"

    def _read(self, offset, view, file_offset, past_end_zeros):
        try:
            n = self._file.read(file_offset, view)
        except OSError as e:
            raise FileError(
                f"cannot read image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None
        if n < len(view):
            if not past_end_zeros:
                raise FileError(
                    f"cannot read image '{self.path}' at offset {offset}: the file ends at "
                    f"{file_offset + n}, before data the image maps there (truncated image?)"
                )
            # qemu rounds a raw image up to whole sectors, which read as zeros.
            _fill_zeros(view[n:])


class RawWriter:
    """A new sparse raw image written in place, as a copy destination."""

    def __init__(self, path, size, _file=None):
        if _file is None:
            _file = _File.open(path, writable=True, create=True)
            try:
                os.ftruncate(_file.fd, size)
            except OSError as e:
                _file.release()
                raise FileError(f"cannot create image '{path}': {e.strerror}") from None
        self._file = _file
        self.path = path
        self.size = size
        self.is_zero = True
        self.max_connections = MAX_CONNECTIONS
        self.max_request = MAX_REQUEST

    def clone(self):
        self._file.acquire()
        return RawWriter(self.path, self.size, _file=self._file)

    def extents(self, offset=0, length=None):
        end = self.size if length is None else min(offset + length, self.size)
        for start, length_, zero, hole in self._file.raw_extents(offset, end):
            yield _copy.Extent(start, length_, zero, hole)

    def readinto(self, offset, buf):
        view = _byte_view(buf)
        _check_range("read", offset, len(view), self.size)
        try:
            n = self._file.read(offset, view)
        except OSError as e:
            raise FileError(
                f"cannot read image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None
        _fill_zeros(view[n:])

    def write(self, offset, buf):
        view = _byte_view(buf)
        _check_range("write", offset, len(view), self.size)
        try:
            self._file.write(offset, view)
        except OSError as e:
            raise FileError(
                f"cannot write image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None

    def zero(self, offset, length):
        _check_range("zero", offset, length, self.size)
        try:
            if not _punch_hole(self._file.fd, offset, length):
                _write_zeros(self._file, offset, length)
        except OSError as e:
            raise FileError(
                f"cannot zero image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None

    def flush(self):
        try:
            self._file.sync()
        except OSError as e:
            raise FileError(f"cannot flush image '{self.path}': {e.strerror}") from None

    def close(self):
        if self._file is not None:
            self._file.release()
            self._file = None

    def __repr__(self):
        return f"<RawWriter {self.path!r}>"


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
            file = _File.open(path, writable=True, create=True)
            _state = _Qcow2State(file, size)
        self._state = _state
        self.path = path
        self.size = _state.size
        self.is_zero = True
        self.max_connections = MAX_CONNECTIONS
        self.max_request = MAX_REQUEST

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
        view = _byte_view(buf)
        _check_range("read", offset, len(view), self.size)
        pos = 0
        for start, length, host in self._mapped(offset, len(view), False):
            part = view[pos : pos + length]
            if host is None:
                _fill_zeros(part)
            else:
                try:
                    n = self._state.file.read(host, part)
                except OSError as e:
                    raise FileError(
                        f"cannot read image '{self.path}' at offset {start}: {e.strerror}"
                    ) from None
                # A cluster written only in part ends in a hole, or at the
                # end of the file.
                _fill_zeros(part[n:])
            pos += length

    def write(self, offset, buf):
        view = _byte_view(buf)
        _check_range("write", offset, len(view), self.size)
        pos = 0
        for start, length, host in self._mapped(offset, len(view), True):
            try:
                self._state.file.write(host, view[pos : pos + length])
            except OSError as e:
                raise FileError(
                    f"cannot write image '{self.path}' at offset {start}: {e.strerror}"
                ) from None
            pos += length

    def zero(self, offset, length):
        """Clusters never written read as zeros already; written ones get zeros."""
        _check_range("zero", offset, length, self.size)
        for start, length_, host in self._mapped(offset, length, False):
            if host is not None:
                try:
                    _write_zeros(self._state.file, host, length_)
                except OSError as e:
                    raise FileError(
                        f"cannot zero image '{self.path}' at offset {start}: {e.strerror}"
                    ) from None

    def flush(self):
        try:
            self._state.flush()
        except OSError as e:
            raise FileError(f"cannot flush image '{self.path}': {e.strerror}") from None

    def close(self):
        state, self._state = self._state, None
        if state is None:
            return
        try:
            if state.file.users == 1:
                state.flush()
        except OSError as e:
            raise FileError(f"cannot flush image '{self.path}': {e.strerror}") from None
        finally:
            state.file.release()

    def __repr__(self):
        return f"<Qcow2Writer {self.path!r}>"

    def _mapped(self, offset, length, allocate):
        try:
            return self._state.map(offset, length, allocate)
        except OSError as e:
            raise FileError(
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
            entries = self.file.read_metadata(table + slot, count * ENTRY_SIZE)
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


class _File:
    """An open image file, shared by an endpoint and its clones and closed
    with the last of them.

    Clones share the descriptors instead of duplicating them: closing any
    descriptor of a file drops the record locks the process holds on it
    (fcntl(2)), and with them the image lock.
    """

    def __init__(self, path, fd, direct_fd):
        self.path = path
        self.fd = fd
        self.direct_fd = direct_fd
        self.page_cache = True
        self.users = 1
        self._users_lock = threading.Lock()
        self._block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    @classmethod
    def open(cls, path, writable=False, create=False):
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        action = "create" if create else "open"
        try:
            fd = os.open(path, flags | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
        except OSError as e:
            raise FileError(f"cannot {action} image '{path}': {e.strerror}") from None
        try:
            direct_fd = os.open(path, flags | os.O_DIRECT)
        except OSError:
            # File systems without direct I/O (tmpfs): the page cache then.
            direct_fd = None
        try:
            return cls(path, fd, direct_fd)
        except BaseException:
            os.close(fd)
            if direct_fd is not None:
                os.close(direct_fd)
            raise

    def acquire(self):
        with self._users_lock:
            self.users += 1

    def release(self):
        with self._users_lock:
            self.users -= 1
            if self.users:
                return
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)

    def lock_shared(self):
        """Hold qemu's image lock as a reader that lets nobody write or resize."""
        for byte in READER_LOCK_BYTES:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, byte)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                    # No locks on this file system: qemu reads it unlocked too.
                    return
                raise _qemu.QemuError(
                    f"cannot read image '{self.path}': it is locked by another process "
                    f"({e.strerror}); stop the process using it"
                ) from None

    def size(self):
        if self._block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def read(self, offset, view):
        """Read into view from offset; return how many bytes the file had.

        What the page cache holds is copied from it (a read that must not
        wait for the storage), unless page_cache is False; the rest is read
        with direct I/O, so a copy does not fill the cache with a whole image.
        """
        length = len(view)
        done = self._read_cached(offset, view) if self.page_cache else 0
        if done == length:
            return done
        if self.direct_fd is not None and _aligned(offset + done, length - done):
            n = self._read_direct(offset + done, view[done:])
            if n is not None:
                # Direct reads stop short only at the end of the file.
                return done + n
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def write(self, offset, view):
        length = len(view)
        done = 0
        if self.direct_fd is not None and _aligned(offset, length):
            try:
                while done < length:
                    done += os.pwrite(self.direct_fd, view[done:], offset + done)
            except OSError as e:
                # EINVAL: the buffer's address does not suit direct I/O.
                if e.errno != errno.EINVAL or done:
                    raise
        while done < length:
            done += os.pwrite(self.fd, view[done:], offset + done)

    def read_metadata(self, offset, length):
        """An array("Q") of the big-endian entries at offset; zeros past the end."""
        data = os.pread(self.fd, length, offset)
        entries = array("Q", data + bytes(length - len(data)))
        if _SWAP:
            entries.byteswap()
        return entries

    def write_metadata(self, offset, data):
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def sync(self):
        os.fsync(self.fd)

    def raw_extents(self, start, end):
        """Yield (start, length, zero, hole) of [start, end) from the file's
        holes; past the end of the file the image reads as zeros."""
        data_end = min(end, self.size())
        pos = start
        while pos < data_end:
            try:
                data = min(os.lseek(self.fd, pos, os.SEEK_DATA), data_end)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data = data_end
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    # No hole information (some file systems): all data.
                    yield pos, data_end - pos, False, False
                    pos = data_end
                    break
                else:
                    raise
            if data > pos:
                yield pos, data - pos, True, True
                pos = data
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), data_end)
            yield pos, hole - pos, False, False
            pos = hole
        if pos < end:
            yield pos, end - pos, True, True

    def _read_cached(self, offset, view):
        """Copy what the page cache holds of [offset, offset + len(view)),
        from its start; return how many bytes that was."""
        if _RWF_NOWAIT is None:
            return 0
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done, _RWF_NOWAIT)
                if n == 0:
                    break
                done += n
        except OSError as e:
            # EAGAIN: the rest is not cached. EOPNOTSUPP: no such reads here.
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise
        return done

    def _read_direct(self, offset, view):
        """Read with direct I/O; None when the buffer's address does not suit it."""
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.direct_fd, [view[done:]], offset + done)
                if n == 0 or n % DIRECT_ALIGNMENT:
                    return done + n
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL or done:
                raise
            return None
        return done


class _ExtentMap:
    """The ranges of a qcow2 image and where their data lies in its file,
    in arrays: ``qemu-img map`` output without the per-object cost."""

    def __init__(self):
        self._starts = array("q")
        # The offset of the data in the file, -1 for ranges reading as zeros.
        self._offsets = array("q")
        self._holes = bytearray()
        self.end = 0

    def __len__(self):
        return len(self._starts)

    def add(self, start, length, offset, hole):
        self._starts.append(start)
        self._offsets.append(offset)
        self._holes.append(hole)
        self.end = start + length

    def ranges(self, offset, end):
        """Yield (start, length, zero, hole) covering [offset, end)."""
        i = self._index(offset)
        while offset < end:
            stop = min(self._end_of(i), end)
            yield offset, stop - offset, self._offsets[i] < 0, bool(self._holes[i])
            offset = stop
            i += 1

    def pieces(self, offset, end):
        """Yield (start, length, file offset or None) covering [offset, end)."""
        i = self._index(offset)
        while offset < end:
            stop = min(self._end_of(i), end)
            file_offset = self._offsets[i]
            if file_offset < 0:
                yield offset, stop - offset, None
            else:
                yield offset, stop - offset, file_offset + offset - self._starts[i]
            offset = stop
            i += 1

    def data_at(self, offset, length):
        """The file offset of a data range lying in one piece of the file, or None."""
        if not self._starts:
            return None
        i = self._index(offset)
        file_offset = self._offsets[i]
        if file_offset < 0 or offset + length > self._end_of(i):
            return None
        return file_offset + offset - self._starts[i]

    def _index(self, offset):
        return max(bisect.bisect_right(self._starts, offset) - 1, 0)

    def _end_of(self, i):
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.end


def _is_image_file(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _plain_qcow2(info):
    """Whether qemu-img info shows nothing that moves data out of the file's clusters."""
    specific = (info.get("format-specific") or {}).get("data") or {}
    return not (
        info.get("encrypted")
        or info.get("dirty-flag")
        or specific.get("data-file")
        or specific.get("corrupt")
    )


def _load_map(image, size):
    """The _ExtentMap of a qcow2 image whose data all lies in its own file,
    or None when some does not (or the map is too large to keep)."""
    extent_map = _ExtentMap()
    with closing(_qemu_img_map(image, "qcow2")) as entries:
        for entry in entries:
            if entry["start"] != extent_map.end or len(extent_map) == MAX_MAP_EXTENTS:
                return None
            if entry["data"]:
                # Compressed clusters have no offset; a depth above 0 means
                # the data comes from a backing file.
                if entry.get("depth") != 0 or "offset" not in entry:
                    return None
                offset = entry["offset"]
            elif entry["zero"]:
                offset = -1
            else:
                return None
            extent_map.add(entry["start"], entry["length"], offset, not entry.get("present", True))
    if extent_map.end != size:
        return None
    return extent_map


def _qemu_img_map(image, fmt):
    """Yield the ranges of ``qemu-img map --output=json`` as qemu prints
    them, one a line, so a huge map is never held whole.

    Raises _qemu.QemuError when qemu-img fails; closing the generator early
    stops qemu-img.
    """
    cmd = [_qemu.QEMU_IMG, "map", "--output=json", "-f", fmt, os.path.abspath(image)]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise _qemu.QemuError(
            f"{_qemu.QEMU_IMG} not found: install qemu-utils (Debian, Ubuntu) or qemu-img "
            f"(Fedora, EL)"
        ) from None
    try:
        for line in proc.stdout:
            # "[{...},", "{...}," ... "{...}]"
            text = line.strip().lstrip(b"[").rstrip(b",]")
            if text:
                yield json.loads(text)
        error = proc.stderr.read().decode("utf-8", errors="replace").strip()
        if proc.wait() != 0:
            raise _qemu.QemuError(
                f"cannot map image '{image}': {error or f'qemu-img exited with {proc.returncode}'}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _aligned(offset, length):
    return not (offset % DIRECT_ALIGNMENT or length % DIRECT_ALIGNMENT)


def _check_range(what, offset, length, size):
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(
            f"cannot {what} {length} bytes at offset {offset}: outside the image ({size} bytes)"
        )


def _byte_view(buf):
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


_ZEROS = memoryview(bytes(ZERO_CHUNK))


def _fill_zeros(view):
    for pos in range(0, len(view), ZERO_CHUNK):
        part = view[pos : pos + ZERO_CHUNK]
        part[:] = _ZEROS[: len(part)]


def _write_zeros(file, offset, length):
    for pos in range(0, length, ZERO_CHUNK):
        file.write_metadata(offset + pos, _ZEROS[: min(ZERO_CHUNK, length - pos)])


def _to_disk(entries):
    """The bytes of an array("Q") as qcow2 stores them (big-endian)."""
    if _SWAP:
        entries = array("Q", entries)
        entries.byteswap()
    return entries.tobytes()


def _libc_fallocate():
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_fallocate = _libc_fallocate()


def _punch_hole(fd, offset, length):
    """Deallocate a range so it reads as zeros; False when the file system cannot."""
    if length == 0:
        return True
    if _fallocate is None:
        return False
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(error, os.strerror(error))
