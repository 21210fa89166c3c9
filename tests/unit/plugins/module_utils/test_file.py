# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""_file and _image's choice of endpoint, against real images made by
qemu-img and qemu-io, checked with qemu-img and the imageio client."""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import random
import subprocess

import pytest
from ovirt_imageio import client as imageio_client

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _checksum,
    _copy,
    _file,
    _image,
    _nbd_endpoint,
    _qcow2,
    _qemu_img,
    _qemu_nbd,
)
from tests.helpers import qemu_io
from tests.unit.conftest import child_pids, open_fds

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# Not a multiple of the 64 KiB cluster.
SIZE = 20 * MiB + 4 * KiB

# (offset, length) of random data; the rest reads as zeros. Some runs start
# or end inside a cluster, one ends at the end of the image.
DATA = [
    (0, 1 * MiB),
    (3 * MiB + 4 * KiB, 60 * KiB),
    (5 * MiB - 8 * KiB, 24 * KiB),
    (12 * MiB, 5 * MiB),
    (SIZE - 8 * KiB, 8 * KiB),
]
ALLOCATED_ZEROS = (8 * MiB, 1 * MiB)


# Images: name -> how it is read (the file itself, or qemu-nbd).
DIRECT = "direct"
QEMU_NBD = "qemu-nbd"
IMAGES = {
    "raw": DIRECT,
    # qemu rounds a raw image up to whole 512 byte sectors.
    "raw-odd-size": DIRECT,
    "qcow2": DIRECT,
    # Not a multiple of 4 KiB: the last sector is read through the page cache.
    "qcow2-sector-size": DIRECT,
    "qcow2-v2": DIRECT,
    "qcow2-backing-unused": DIRECT,
    "qcow2-backing": QEMU_NBD,
    "qcow2-compressed": QEMU_NBD,
    "qcow2-data-file": QEMU_NBD,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("file-images")
    rng = random.Random(7)
    raw = str(d / "raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA:
            f.seek(offset)
            f.write(rng.randbytes(length))
    paths = {"raw": raw}

    odd = str(d / "raw-odd-size")
    with open(raw, "rb") as f, open(odd, "wb") as out:
        out.write(f.read(SIZE - 3 * KiB - 24))
    paths["raw-odd-size"] = odd

    def convert(name, *args, src=raw):
        path = str(d / name)
        subprocess.run(["qemu-img", "convert", "-f", "raw", *args, src, path], check=True)
        paths[name] = path
        return path

    qcow2 = convert("qcow2", "-O", "qcow2")
    qemu_io(qcow2, "qcow2", "write -z {} {}".format(*ALLOCATED_ZEROS))
    convert("qcow2-v2", "-O", "qcow2", "-o", "compat=0.10")
    convert("qcow2-compressed", "-c", "-O", "qcow2")
    convert("qcow2-data-file", "-O", "qcow2", "-o", f"data_file={d / 'data-file.raw'}")

    sector = str(d / "sector.raw")
    with open(raw, "rb") as f, open(sector, "wb") as out:
        out.write(f.read(SIZE - 3 * KiB - 512))
    convert("qcow2-sector-size", "-O", "qcow2", src=sector)

    # A backing file whose data the top layer covers or leaves as zeros.
    empty = str(d / "empty-base.qcow2")
    _qemu_img.create(empty, "qcow2", SIZE)
    unused = convert("qcow2-backing-unused", "-O", "qcow2", "-B", empty, "-F", "qcow2")
    assert _qemu_img.info(unused)["backing-filename"] == empty

    base = str(d / "base.qcow2")
    _qemu_img.create(base, "qcow2", SIZE)
    qemu_io(base, "qcow2", "write -P 0x61 2M 1M", "write -P 0x62 12M 64k")
    top = str(d / "qcow2-backing")
    _qemu_img.create(top, "qcow2", SIZE, backing=base, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x63 0 64k", "write -z 12M 32k")
    paths["qcow2-backing"] = top
    return paths


@pytest.fixture(autouse=True)
def no_leaks():
    """No child process (qemu-nbd, qemu-img) and no descriptor outlives a test."""
    children = child_pids()
    fds = open_fds()
    yield
    assert child_pids() <= children
    assert open_fds().items() <= fds.items()


def compare(a, b):
    subprocess.run(["qemu-img", "compare", "-q", a, b], check=True)


def check_clean(path):
    """qemu-img check finds neither corruption nor leaks."""
    result = _qemu_img.check(path, fmt="qcow2")
    assert result["check-errors"] == 0
    assert result.get("corruptions", 0) == 0
    assert result.get("leaks", 0) == 0


def layout(extents, holes=True):
    """Extents merged where they read the same way."""
    merged = []
    for ext in extents:
        kind = (ext.zero, ext.hole) if holes else (ext.zero,)
        if merged and merged[-1][2] == kind:
            merged[-1][1] += ext.length
        else:
            merged.append([ext.start, ext.length, kind])
    return [tuple(m) for m in merged]


def qemu_img_map(path):
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", path], check=True, capture_output=True
    ).stdout
    return json.loads(out)


def raw_bytes(path, tmp_path):
    out = str(tmp_path / "as-raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, out], check=True)
    with open(out, "rb") as f:
        return f.read()


# Reading: which images are read from the file, and what they read.


@pytest.mark.parametrize("dst_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("name", IMAGES)
def test_open_endpoint_copies_every_image(images, tmp_path, name, dst_fmt):
    image = images[name]
    out = str(tmp_path / f"out.{dst_fmt}")
    with _image.open_endpoint(image, None) as src:
        expected = _file.FileReader if IMAGES[name] == DIRECT else _nbd_endpoint.NbdEndpoint
        assert isinstance(src, expected)
        assert src.size == _qemu_img.info(image)["virtual-size"]
        with _image.create_endpoint(out, dst_fmt, src.size) as dst:
            assert isinstance(dst, _qcow2.Qcow2Writer if dst_fmt == "qcow2" else _file.RawWriter)
            stats = _copy.copy(src, dst, workers=4, request_size=1 * MiB)
            written = _checksum.checksum(dst)
        ours = _checksum.checksum(src)
    assert stats.done == stats.size
    compare(image, out)
    if dst_fmt == "qcow2":
        check_clean(out)
    assert ours == written == imageio_client.checksum(image)


@pytest.mark.parametrize("name", [n for n, how in IMAGES.items() if how == DIRECT])
def test_extents_match_qemu_nbd(images, name):
    image = images[name]
    info = _qemu_img.info(image)
    fmt = info["format"]
    # qemu-nbd calls the whole last sector data, though the file may end
    # inside it; the reader calls the bytes past the end zeros.
    end = info["virtual-size"] // (4 * KiB) * (4 * KiB)
    with _image.open_endpoint(image, fmt) as direct, _qemu_nbd.serve(image, fmt=fmt) as export:
        nbd = _nbd_endpoint.NbdEndpoint(export.url, allocation_depth=fmt != "raw")
        try:
            assert layout(direct.extents(0, end)) == layout(nbd.extents(0, end))
            window = (3 * MiB + 8 * KiB, 10 * MiB + 4 * KiB)
            assert layout(direct.extents(*window)) == layout(nbd.extents(*window))
        finally:
            nbd.close()


def test_qcow2_extents_and_file_ranges(images):
    with _image.open_endpoint(images["qcow2"], "qcow2") as src:
        extents = list(src.extents())
        assert extents[0].start == 0
        assert extents[-1].end == SIZE
        assert all(a.end == b.start for a, b in itertools.pairwise(extents))
        # The allocated zeros are zero but not a hole; never written is a hole.
        at = next(e for e in extents if e.start <= ALLOCATED_ZEROS[0] < e.end)
        assert at.zero and not at.hole
        at = next(e for e in extents if e.start <= 10 * MiB < e.end)
        assert at.zero and at.hole

        # Data lies in the file where qemu-img map says.
        first = qemu_img_map(images["qcow2"])[0]
        assert first["data"]
        fd, offset = src.file_range(4 * KiB, 8 * KiB)
        assert offset == first["offset"] + 4 * KiB
        with open(images["raw"], "rb") as f:
            assert os.pread(fd, 8 * KiB, offset) == f.read(12 * KiB)[4 * KiB :]
        # Zeros and ranges over several pieces have no single place.
        assert src.file_range(10 * MiB, 4 * KiB) is None
        assert src.file_range(MiB - 4 * KiB, 8 * KiB) is None


def test_raw_file_range(images):
    with _image.open_endpoint(images["raw-odd-size"], "raw") as src:
        _fd, offset = src.file_range(MiB, 4 * KiB)
        assert offset == MiB
        end = os.path.getsize(images["raw-odd-size"])
        # The zeros qemu adds after the end of the file are not in it.
        assert src.file_range(end - 4 * KiB, 8 * KiB) is None


@pytest.mark.parametrize("name", ["raw", "qcow2"])
def test_readinto_any_range(images, tmp_path, name):
    """Reads of any alignment and buffer: direct I/O where it fits, the
    page cache where it does not."""
    expected = raw_bytes(images[name], tmp_path)
    with _image.open_endpoint(images[name], None) as src:
        for offset, length in [
            (0, 4 * KiB),
            (1000, 3000),
            (MiB - 512, 64 * KiB),
            (3 * MiB, 2 * MiB),
            (SIZE - 12 * KiB, 12 * KiB),
            (SIZE - 1, 1),
        ]:
            buf = bytearray(length)
            src.readinto(offset, buf)
            assert buf == expected[offset : offset + length], (offset, length)
        with pytest.raises(ValueError, match="outside the image"):
            src.readinto(SIZE - 4 * KiB, bytearray(8 * KiB))


@pytest.mark.parametrize("page_cache", [True, False])
def test_reads_partly_cached_image(tmp_path, page_cache):
    """A read whose start is in the page cache and whose end is not takes
    the first part from the cache and the rest from the storage."""
    image = str(tmp_path / "partly-cached.raw")
    expected = random.Random(7).randbytes(12 * MiB)
    with open(image, "wb") as f:
        f.write(expected)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        # Drop the whole file from the cache, then read its first 6 MiB back
        # in, without read-ahead.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 6 * MiB, 0)
    finally:
        os.close(fd)
    # Page aligned, as direct I/O wants it.
    buf = mmap.mmap(-1, 8 * MiB)
    with _image.open_endpoint(image, "raw", page_cache=page_cache) as src:
        src.readinto(2 * MiB, buf)
    assert buf[:] == expected[2 * MiB : 10 * MiB]


def test_image_info_uses_the_file(images):
    facts = _image.inspect(images["qcow2"], checksum_algorithm="blake2b")
    # Whole clusters, as qemu-img map counts them.
    mapped = qemu_img_map(images["qcow2"])
    assert facts["data_bytes"] == sum(e["length"] for e in mapped if e["data"])
    assert facts["data_bytes"] + facts["zero_bytes"] == SIZE
    assert facts["checksum"] == imageio_client.checksum(images["qcow2"])


# Locking and bad images.


def test_reader_locks_the_image_against_writers(images, tmp_path):
    image = str(tmp_path / "locked.qcow2")
    subprocess.run(["cp", images["qcow2"], image], check=True)
    write = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 4k", image]
    with _image.open_endpoint(image, "qcow2") as src:
        assert isinstance(src, _file.FileReader)
        clone = src.clone()
        clone.close()
        # Closing a clone keeps the lock: the clones share the descriptors.
        proc = subprocess.run(write, capture_output=True, text=True, check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        # Readers are welcome.
        subprocess.run(["qemu-img", "info", image], check=True, capture_output=True)
    subprocess.run(write, check=True, capture_output=True)


def test_image_in_use_by_a_writer_is_refused(images, tmp_path):
    image = str(tmp_path / "in-use.qcow2")
    subprocess.run(["cp", images["qcow2"], image], check=True)
    with (
        _qemu_nbd.serve(image, fmt="qcow2", readonly=False),
        pytest.raises(_qemu_img.QemuError, match='Failed to get shared "write" lock'),
        _image.open_endpoint(image, "qcow2"),
    ):
        pytest.fail("a written image must not be read")


def test_missing_image(tmp_path):
    missing = str(tmp_path / "missing.qcow2")
    with (
        pytest.raises(_qemu_img.QemuError, match="no such file"),
        _image.open_endpoint(missing, None),
    ):
        pytest.fail("nothing to read")


def test_truncated_qcow2_is_refused(images, tmp_path):
    image = str(tmp_path / "truncated.qcow2")
    with open(images["qcow2"], "rb") as f, open(image, "wb") as out:
        out.write(f.read(2 * MiB))
    with (
        pytest.raises(_qemu_img.QemuError, match="is corrupt"),
        _image.open_endpoint(image, "qcow2"),
    ):
        pytest.fail("a truncated image must not be read")


def test_wrong_format(images):
    with (
        pytest.raises(_qemu_img.QemuError, match="Image is not in qcow2 format"),
        _image.open_endpoint(images["raw"], "qcow2"),
    ):
        pytest.fail("a raw image is not qcow2")


def test_huge_map_is_left_to_qemu_nbd(images, monkeypatch):
    monkeypatch.setattr(_file, "MAX_MAP_EXTENTS", 3)
    with _image.open_endpoint(images["qcow2"], "qcow2") as src:
        assert isinstance(src, _nbd_endpoint.NbdEndpoint)


# Writing.


class Model:
    """What an image should read, kept beside the writer."""

    def __init__(self, size):
        self.data = bytearray(size)

    def write(self, offset, data):
        self.data[offset : offset + len(data)] = data

    def zero(self, offset, length):
        self.data[offset : offset + length] = bytes(length)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_writer_unaligned_and_repeated_writes(tmp_path, fmt):
    size = 3 * MiB + 512
    rng = random.Random(3)
    path = str(tmp_path / f"out.{fmt}")
    model = Model(size)
    writer = _image.WRITERS[fmt](path, size)
    try:
        assert writer.size == size
        assert writer.is_zero
        assert list(writer.extents()) == [_copy.Extent(0, size, True, True)]
        clone = writer.clone()
        for target, offset, length in [
            (writer, 3000, 1000),
            (clone, 64 * KiB - 2 * KiB, 4 * KiB),
            (writer, MiB + 512, MiB),
            (clone, size - 512, 512),
            # Over data written before, in part.
            (writer, MiB + 256 * KiB, 8 * KiB),
            (writer, 0, 4 * KiB),
        ]:
            data = rng.randbytes(length)
            target.write(offset, data)
            model.write(offset, data)
        clone.close()
        writer.zero(MiB + 4 * KiB, 100 * KiB)
        model.zero(MiB + 4 * KiB, 100 * KiB)
        writer.zero(2 * MiB + 512 * KiB, 64 * KiB)
        writer.flush()
        data = rng.randbytes(64 * KiB)
        writer.write(2 * MiB + 64 * KiB, data)
        model.write(2 * MiB + 64 * KiB, data)

        buf = bytearray(size)
        writer.readinto(0, buf)
        assert buf == model.data
        extents = list(writer.extents())
        assert sum(e.length for e in extents) == size
        for ext in extents:
            if ext.zero:
                assert model.data[ext.start : ext.end] == bytes(ext.length)
    finally:
        writer.close()
    if fmt == "qcow2":
        check_clean(path)
        assert _qemu_img.info(path)["virtual-size"] == size
    assert raw_bytes(path, tmp_path) == model.data


def test_qcow2_writer_crosses_a_refcount_block(tmp_path):
    """Past 32768 clusters (2 GiB of file), the file holds a second
    refcount block; one small write per cluster gets there in a sparse file."""
    size = 2 * GiB + 256 * MiB
    path = str(tmp_path / "big.qcow2")
    clusters = 32800
    writer = _qcow2.Qcow2Writer(path, size)
    try:
        for i in range(clusters):
            writer.write(i * 64 * KiB + 512, (i % 251).to_bytes(1, "big") * 512)
    finally:
        writer.close()
    check_clean(path)
    info = _qemu_img.info(path)
    assert info["virtual-size"] == size
    assert os.path.getsize(path) > 2 * GiB
    for i in (0, 32700, 32767, 32768, clusters - 1):
        pattern = i % 251
        offset = i * 64 * KiB
        qemu_io(
            path,
            "qcow2",
            f"read -P 0 {offset} 512",
            f"read -P {pattern} {offset + 512} 512",
            f"read -P 0 {offset + 1024} {63 * KiB}",
        )
    with _image.open_endpoint(path, "qcow2") as src:
        assert isinstance(src, _file.FileReader)
        data = sum(e.length for e in src.extents() if not e.zero)
    assert data == clusters * 64 * KiB


def test_qcow2_writer_empty_8t(tmp_path):
    path = str(tmp_path / "empty.qcow2")
    with _image.create_endpoint(path, "qcow2", 8 * TiB) as dst:
        assert list(dst.extents()) == [_copy.Extent(0, 8 * TiB, True, True)]
    check_clean(path)
    assert _qemu_img.info(path)["virtual-size"] == 8 * TiB
    assert os.path.getsize(path) < 1 * MiB
    empty = str(tmp_path / "reference.qcow2")
    _qemu_img.create(empty, "qcow2", 8 * TiB)
    compare(empty, path)


def test_qcow2_writer_rounds_size_to_sectors(tmp_path):
    path = str(tmp_path / "odd.qcow2")
    with _image.create_endpoint(path, "qcow2", 1000) as dst:
        assert dst.size == 1024
        dst.write(0, b"\x42" * 1000)
    check_clean(path)
    assert raw_bytes(path, tmp_path) == b"\x42" * 1000 + bytes(24)


def test_writer_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.qcow2"
    path.write_bytes(b"\xff" * (3 * MiB))
    with _image.create_endpoint(str(path), "qcow2", 2 * MiB) as dst:
        dst.write(MiB, b"\x01" * (64 * KiB))
    check_clean(str(path))
    assert raw_bytes(str(path), tmp_path) == bytes(MiB) + b"\x01" * (64 * KiB) + bytes(
        MiB - 64 * KiB
    )


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_writer_in_missing_directory(tmp_path, fmt):
    path = str(tmp_path / "no" / "such" / "dir" / f"out.{fmt}")
    with pytest.raises(_file.FileError, match=rf"cannot create image '{path}': No such file"):
        _image.WRITERS[fmt](path, MiB)
    assert not os.path.exists(os.path.dirname(path))


def test_writer_out_of_range(tmp_path):
    with (
        contextlib.closing(_qcow2.Qcow2Writer(str(tmp_path / "out"), MiB)) as dst,
        pytest.raises(ValueError, match=r"cannot write 8192 bytes at offset 1044480"),
    ):
        dst.write(MiB - 4 * KiB, bytes(8 * KiB))


def test_create_endpoint_other_formats_use_qemu_nbd(images, tmp_path):
    out = str(tmp_path / "out.vmdk")
    with (
        _image.open_endpoint(images["qcow2"], "qcow2") as src,
        _image.create_endpoint(out, "vmdk", src.size) as dst,
    ):
        assert isinstance(dst, _nbd_endpoint.NbdEndpoint)
        _copy.copy(src, dst)
    compare(images["qcow2"], out)


def test_copy_from_nbdkit_into_qcow2_writer(tmp_path, nbd_servers):
    """Extents in 4 KiB steps, not clusters: partial clusters everywhere."""
    server = nbd_servers.nbdkit(
        "sparse-random", "size=32M", "percent=30", "runlength=12288", "seed=11"
    )
    out = str(tmp_path / "out.qcow2")
    src = _nbd_endpoint.NbdEndpoint(server.url)
    try:
        with _image.create_endpoint(out, "qcow2", src.size) as dst:
            stats = _copy.copy(src, dst, workers=4, request_size=256 * KiB)
    finally:
        src.close()
    assert 0 < stats.data_bytes < stats.size
    check_clean(out)
    subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", server.url, out], check=True
    )


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_endpoint_failure_keeps_the_error(tmp_path, fmt):
    path = str(tmp_path / f"out.{fmt}")
    with (
        pytest.raises(RuntimeError, match="the copy failed"),
        _image.create_endpoint(path, fmt, MiB) as dst,
    ):
        dst.write(0, b"\x01" * (64 * KiB))
        raise RuntimeError("the copy failed")
