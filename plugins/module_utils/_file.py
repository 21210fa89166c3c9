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
  is left to qemu-nbd: reader() returns None then.
- RawWriter writes a new raw image (_qcow2.Qcow2Writer a new qcow2 one).

Reads and writes use direct I/O where offsets and lengths allow, as qemu-nbd
does with ``--cache=none`` (what imageio and vdsm run): writing through the
page cache costs several times the CPU of the copy itself, and copying from
it a sixth of a TLS upload's. Only unaligned pieces (the end of an image
whose size is not a multiple of 4 KiB) go through the page cache.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import os
import stat
import threading
from array import array
from contextlib import closing

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _qemu_img
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import ZEROS, KiB, MiB, byte_view

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


# preadv2(2) flag: fail with EAGAIN instead of waiting for the storage
# (Linux 4.14, Python 3.7).
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class FileError(_copy.CopyError):
    """A local image file could not be read or written; the message says which and why."""


def open_locked(image, page_cache=True):
    """The File of a local image, locked as qemu locks an image it reads
    (nobody may write or resize it until the File is released); None for an
    NBD URL or a path qemu must open itself.

    page_cache: copy what the page cache holds of the image from it (see
    File.read); when False, read everything with direct I/O.
    """
    if _qemu_img.is_nbd_url(image) or not _is_image_file(image):
        return None
    try:
        file = File.open(image)
    except FileError:
        # qemu-img tells why, as it does for every image it cannot open.
        return None
    file.page_cache = page_cache
    try:
        file.lock_shared()
    except BaseException:
        file.release()
        raise
    return file


def reader(file, info, check=None):
    """A FileReader of a locked image file, or None when qemu-nbd must read it.
    Takes a reference to file.

    info, check: what qemu-img info and, for a qcow2 image, qemu-img check
    say of it (a compressed cluster needs qemu to read it).
    """
    fmt = info["format"]
    size = info["virtual-size"]
    if fmt == "raw":
        file.acquire()
        return FileReader(file, size)
    if fmt == "qcow2" and _plain_qcow2(info) and not (check or {}).get("compressed-clusters"):
        extent_map = _load_map(file.path, size)
        if extent_map is not None:
            file.acquire()
            return FileReader(file, size, extent_map)
    return None


class _FileEndpoint:
    """What the endpoints of a File share: its size and limits, and releasing
    the File (closed with the last of them)."""

    def __init__(self, file, size, is_zero):
        self._file = file
        self.path = file.path
        self.size = size
        self.is_zero = is_zero
        self.max_connections = MAX_CONNECTIONS
        self.max_request = MAX_REQUEST

    def close(self):
        if self._file is not None:
            self._file.release()
            self._file = None

    def _read_file(self, offset, view, file_offset):
        """Read the file at file_offset into view, for the image's offset;
        the bytes read."""
        try:
            return self._file.read(file_offset, view)
        except OSError as e:
            raise FileError(
                f"cannot read image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None


class FileReader(_FileEndpoint):
    """A local raw or qcow2 image read from its file, as a copy source.

    Has the shape of _nbd_endpoint.NbdEndpoint, plus file_range(): where a guest
    range lies in the file, so a destination may send it from there.
    """

    def __init__(self, file, size, extent_map=None):
        super().__init__(file, size, is_zero=False)
        self._map = extent_map

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
        view = byte_view(buf)
        check_range("read", offset, len(view), self.size)
        if self._map is None:
            self._read(offset, view, offset, past_end_zeros=True)
            return
        pos = 0
        for start, length, file_offset in self._map.pieces(offset, offset + len(view)):
            part = view[pos : pos + length]
            if file_offset is None:
                fill_zeros(part)
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

    def __repr__(self):
        return f"<FileReader {self.format} {self.path!r}>"

    def _read(self, offset, view, file_offset, past_end_zeros):
        n = self._read_file(offset, view, file_offset)
        if n < len(view):
            if not past_end_zeros:
                raise FileError(
                    f"cannot read image '{self.path}' at offset {offset}: the file ends at "
                    f"{file_offset + n}, before data the image maps there (truncated image?)"
                )
            # qemu rounds a raw image up to whole sectors, which read as zeros.
            fill_zeros(view[n:])


class RawWriter(_FileEndpoint):
    """A new sparse raw image written in place, as a copy destination."""

    def __init__(self, path, size, _file=None):
        if _file is None:
            _file = File.open(path, writable=True, create=True)
            try:
                os.ftruncate(_file.fd, size)
            except OSError as e:
                _file.release()
                raise FileError(f"cannot create image '{path}': {e.strerror}") from None
        super().__init__(_file, size, is_zero=True)

    def clone(self):
        self._file.acquire()
        return RawWriter(self.path, self.size, _file=self._file)

    def extents(self, offset=0, length=None):
        end = self.size if length is None else min(offset + length, self.size)
        for start, length_, zero, hole in self._file.raw_extents(offset, end):
            yield _copy.Extent(start, length_, zero, hole)

    def readinto(self, offset, buf):
        view = byte_view(buf)
        check_range("read", offset, len(view), self.size)
        n = self._read_file(offset, view, offset)
        fill_zeros(view[n:])

    def write(self, offset, buf):
        view = byte_view(buf)
        check_range("write", offset, len(view), self.size)
        try:
            self._file.write(offset, view)
        except OSError as e:
            raise FileError(
                f"cannot write image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None

    def zero(self, offset, length):
        check_range("zero", offset, length, self.size)
        try:
            if not _punch_hole(self._file.fd, offset, length):
                write_zeros(self._file, offset, length)
        except OSError as e:
            raise FileError(
                f"cannot zero image '{self.path}' at offset {offset}: {e.strerror}"
            ) from None

    def flush(self):
        try:
            self._file.sync()
        except OSError as e:
            raise FileError(f"cannot flush image '{self.path}': {e.strerror}") from None

    def __repr__(self):
        return f"<RawWriter {self.path!r}>"


class File:
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
                raise _qemu_img.QemuError(
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
        """length bytes at offset, through the page cache; zeros past the end."""
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

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
    with closing(_qemu_img.map_extents(image, "qcow2")) as entries:
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


def _aligned(offset, length):
    return not (offset % DIRECT_ALIGNMENT or length % DIRECT_ALIGNMENT)


def check_range(what, offset, length, size):
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(
            f"cannot {what} {length} bytes at offset {offset}: outside the image ({size} bytes)"
        )


def fill_zeros(view):
    for pos in range(0, len(view), ZERO_CHUNK):
        part = view[pos : pos + ZERO_CHUNK]
        part[:] = ZEROS[: len(part)]


def write_zeros(file, offset, length):
    for pos in range(0, length, ZERO_CHUNK):
        file.write_metadata(offset + pos, ZEROS[: min(ZERO_CHUNK, length - pos)])


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
