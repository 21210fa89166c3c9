# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Byte sizes and buffers: the units, views of any buffer as bytes, and I/O
buffers aligned for direct I/O."""

from __future__ import annotations

import contextlib
import mmap

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# A block of zeros to write from, read-only.
ZEROS = memoryview(bytes(MiB))


def byte_view(buf):
    """A one-dimensional memoryview of buf's bytes, whatever its item type."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def aligned_buffer(size):
    """A buffer of size bytes for I/O.

    Anonymous memory starts on a page boundary, as direct I/O on local files
    needs (a bytearray does not). Huge pages, where the system gives them,
    save page faults, and the pinning of every page by direct I/O.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        # Kernels without transparent huge pages refuse the advice.
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return memoryview(buf)


def round_up(value, alignment):
    return -(-value // alignment) * alignment
