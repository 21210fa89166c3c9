# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import threading

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _copy,
    _file,
    _image,
    _nbd,
    _nbd_endpoint,
    _qemu_img,
    _qemu_nbd,
)
from tests.helpers import qemu_io, running

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


def compare(a, b):
    subprocess.run(["qemu-img", "compare", "-q", a, b], check=True)


@pytest.fixture
def qcow2_image(tmp_path):
    """A qcow2 with data, allocated zeros and holes, size not a multiple of 1 MiB."""
    path = str(tmp_path / "src.qcow2")
    _qemu_img.create(path, "qcow2", 20 * MiB + 4096)
    qemu_io(
        path,
        "qcow2",
        "write -P 0x55 0 1M",
        "write -P 0xaa 3M 64k",
        "write -z 5M 2M",
        "write -P 0x01 12M 5M",
        "write -P 0x7f 20M 4k",
    )
    return path


def copy_image(src_image, dst_image, dst_fmt="qcow2", is_zero=True, **kwargs):
    src_fmt = _qemu_img.info(src_image)["format"]
    with (
        _qemu_nbd.serve(src_image, fmt=src_fmt, readonly=True) as src_export,
        _qemu_nbd.serve(dst_image, fmt=dst_fmt, readonly=False) as dst_export,
    ):
        src = _nbd_endpoint.NbdEndpoint(src_export.url, allocation_depth=src_fmt != "raw")
        dst = _nbd_endpoint.NbdEndpoint(dst_export.url, is_zero=is_zero)
        try:
            return _copy.copy(src, dst, **kwargs)
        finally:
            src.close()
            dst.close()


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("src_fmt", ["raw", "qcow2", "compressed"])
def test_copy_to_new_qcow2(tmp_path, qcow2_image, src_fmt, workers):
    src = str(tmp_path / f"src.{src_fmt}")
    if src_fmt == "raw":
        subprocess.run(["qemu-img", "convert", "-O", "raw", qcow2_image, src], check=True)
    elif src_fmt == "compressed":
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", qcow2_image, src], check=True)
    else:
        src = qcow2_image
    dst = str(tmp_path / "dst.qcow2")
    _qemu_img.create(dst, "qcow2", _qemu_img.info(src)["virtual-size"])

    stats = copy_image(src, dst, workers=workers, request_size=1 * MiB)

    compare(src, dst)
    assert stats.done == stats.size == 20 * MiB + 4096
    # 1M + 64k + 5M + 4k of data; the rest (holes and allocated zeros) skipped.
    assert stats.data_bytes == 6 * MiB + 64 * 1024 + 4096
    assert stats.zero_bytes == stats.size - stats.data_bytes
    # NBD to NBD, the data is forwarded from socket to socket.
    assert stats.connections == min(workers, _copy.FORWARD_WORKERS)


def test_copy_over_existing_data_zeroes_holes(tmp_path, qcow2_image):
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.write(b"\xff" * (21 * MiB))

    copy_image(qcow2_image, dst, dst_fmt="raw", is_zero=False)

    with open(dst, "rb") as f:
        data = f.read()
    # Everything the source holds, then the destination's tail untouched.
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", qcow2_image, str(tmp_path / "expected.raw")],
        check=True,
    )
    expected = (tmp_path / "expected.raw").read_bytes()
    assert data[: len(expected)] == expected
    assert data[len(expected) :] == b"\xff" * (21 * MiB - len(expected))


def test_copy_keeps_backing_chain_data(tmp_path, qcow2_image):
    top = str(tmp_path / "top.qcow2")
    _qemu_img.create(top, "qcow2", 20 * MiB + 4096, backing=qcow2_image, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x33 512k 1M", "write -z 12M 1M")
    dst = str(tmp_path / "dst.qcow2")
    _qemu_img.create(dst, "qcow2", 20 * MiB + 4096)

    copy_image(top, dst)

    compare(top, dst)


def test_copy_from_nbdkit_sparse_random(tmp_path):
    sock = str(tmp_path / "nbdkit.sock")
    url = f"nbd+unix:///?socket={sock}"
    cmd = ["nbdkit", "-f", "-U", sock, "--exit-with-parent", "sparse-random", "size=64M",
           "percent=20", "runlength=262144", "seed=7"]  # fmt: skip
    dst_image = str(tmp_path / "dst.qcow2")
    _qemu_img.create(dst_image, "qcow2", 64 * MiB)
    with running(cmd, sock):
        with _qemu_nbd.serve(dst_image, fmt="qcow2", readonly=False) as export:
            src = _nbd_endpoint.NbdEndpoint(url)
            dst = _nbd_endpoint.NbdEndpoint(export.url, is_zero=True)
            try:
                stats = _copy.copy(src, dst, workers=4, request_size=256 * 1024)
            finally:
                src.close()
                dst.close()
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", url, dst_image], check=True
        )
    assert 0 < stats.data_bytes < stats.size


def copy_from_nbdkit(tmp_path, plugin_args, size, workers, forward=True):
    """Copy what nbdkit serves (its log filter on) into a new raw image in
    8 MiB requests and compare them; the copy's stats and nbdkit's log. The
    image is served by qemu-nbd (the data forwarded from socket to socket),
    or with forward=False written in place (the data read into buffers)."""
    sock = str(tmp_path / "nbdkit.sock")
    log = tmp_path / "nbdkit.log"
    cmd = ["nbdkit", "-f", "-U", sock, "--exit-with-parent", "--filter=log", *plugin_args,
           f"logfile={log}"]  # fmt: skip
    dst_image = str(tmp_path / "dst.raw")
    _qemu_img.create(dst_image, "raw", size)
    url = f"nbd+unix:///?socket={sock}"
    with running(cmd, sock):
        src = _nbd_endpoint.NbdEndpoint(url)
        try:
            with contextlib.ExitStack() as stack:
                if forward:
                    export = stack.enter_context(
                        _qemu_nbd.serve(dst_image, fmt="raw", readonly=False)
                    )
                    dst = stack.enter_context(
                        contextlib.closing(_nbd_endpoint.NbdEndpoint(export.url, is_zero=True))
                    )
                else:
                    dst = stack.enter_context(_image.create_endpoint(dst_image, "raw", size))
                assert (src.forwarder(dst) is not None) == forward
                stats = _copy.copy(src, dst, workers=workers, request_size=8 * MiB)
        finally:
            src.close()
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", url, dst_image], check=True)
    return stats, log.read_text()


def test_nbd_requests_are_split(tmp_path):
    """A copy's 8 MiB requests reach the NBD servers as 2 MiB ones, and the
    data arrives whole."""
    plugin = ["sparse-random", "size=64M", "percent=50", "runlength=16777216", "seed=3"]
    stats, log = copy_from_nbdkit(tmp_path, plugin, 64 * MiB, workers=2)
    reads = [
        int(c, 16) for c in re.findall(r"Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", log)
    ]
    assert stats.data_bytes > 0
    assert sum(reads) >= stats.data_bytes
    assert max(reads) == _nbd_endpoint.NBD_REQUEST_SIZE


def test_source_read_error_stops_every_worker(tmp_path):
    sock = str(tmp_path / "nbdkit.sock")
    cmd = ["nbdkit", "-f", "-U", sock, "--exit-with-parent", "--filter=error", "pattern",
           "size=32M", "error-pread=EIO", "error-pread-rate=1"]  # fmt: skip
    dst_image = str(tmp_path / "dst.qcow2")
    _qemu_img.create(dst_image, "qcow2", 32 * MiB)
    threads_before = threading.active_count()
    with running(cmd, sock), _qemu_nbd.serve(dst_image, fmt="qcow2", readonly=False) as export:
        src = _nbd_endpoint.NbdEndpoint(f"nbd+unix:///?socket={sock}")
        dst = _nbd_endpoint.NbdEndpoint(export.url, is_zero=True)
        try:
            with pytest.raises(_nbd.RequestError):
                _copy.copy(src, dst, workers=4, request_size=1 * MiB)
        finally:
            src.close()
            dst.close()
    assert threading.active_count() == threads_before


@pytest.mark.parametrize("forward", [True, False])
def test_reads_are_in_flight_together(tmp_path, forward):
    """A worker keeps its reads in flight together: every piece of a request
    and the next request's, on one connection, whether the data is forwarded
    or read into buffers. The server takes 100 ms a read, so its log shows
    reads started before the first one returns."""
    plugin = ["--filter=delay", "sparse-random", "size=32M", "percent=100", "seed=5",
              "delay-read=100ms"]  # fmt: skip
    _stats, log = copy_from_nbdkit(tmp_path, plugin, 32 * MiB, workers=1, forward=forward)
    outstanding = set()
    most = 0
    for line in log.splitlines():
        started = re.search(r"connection=(\d+) Read id=(\d+)", line)
        returned = re.search(r"connection=(\d+) \.\.\.Read id=(\d+)", line)
        if started:
            outstanding.add(started.groups())
            most = max(most, len(outstanding))
        elif returned:
            outstanding.discard(returned.groups())
    pieces = 8 * MiB // _nbd_endpoint.NBD_REQUEST_SIZE
    assert most >= 2 * pieces


def test_destination_write_error_stops_every_worker(tmp_path, qcow2_image):
    """A write fails while the workers' readers are reading ahead: the copy
    raises the write's error and leaves no thread behind."""
    sock = str(tmp_path / "nbdkit.sock")
    cmd = ["nbdkit", "-f", "-U", sock, "--exit-with-parent", "--filter=error", "memory",
           "size=32M", "error-pwrite=ENOSPC", "error-pwrite-rate=1"]  # fmt: skip
    threads_before = threading.active_count()
    with running(cmd, sock), _qemu_nbd.serve(qcow2_image, fmt="qcow2") as export:
        src = _nbd_endpoint.NbdEndpoint(export.url, allocation_depth=True)
        dst = _nbd_endpoint.NbdEndpoint(f"nbd+unix:///?socket={sock}", is_zero=True)
        try:
            with pytest.raises(_nbd.RequestError, match="ENOSPC"):
                _copy.copy(src, dst, workers=4, request_size=1 * MiB)
        finally:
            src.close()
            dst.close()
    assert threading.active_count() == threads_before


def test_destination_too_small(tmp_path, qcow2_image):
    dst = str(tmp_path / "small.qcow2")
    _qemu_img.create(dst, "qcow2", 10 * MiB)
    with pytest.raises(_copy.CopyError, match=r"needs 20975616 bytes .* holds only 10485760"):
        copy_image(qcow2_image, dst)


def test_empty_8t_image_is_skipped(tmp_path):
    src = str(tmp_path / "empty.qcow2")
    dst = str(tmp_path / "dst.qcow2")
    _qemu_img.create(src, "qcow2", 8 * TiB)
    _qemu_img.create(dst, "qcow2", 8 * TiB)
    progress = []

    stats = copy_image(src, dst, progress=lambda s: progress.append(s.done))

    assert stats.data_bytes == 0
    assert stats.zero_bytes == 8 * TiB
    assert progress == sorted(progress)
    assert progress[-1] == 8 * TiB
    assert os.path.getsize(dst) < 2 * MiB


def test_extents_are_merged_and_cover_the_image(qcow2_image):
    with _qemu_nbd.serve(qcow2_image, fmt="qcow2") as export:
        endpoint = _nbd_endpoint.NbdEndpoint(export.url, allocation_depth=True)
        try:
            extents = list(endpoint.extents())
        finally:
            endpoint.close()
    assert extents[0].start == 0
    assert sum(e.length for e in extents) == 20 * MiB + 4096
    for a, b in itertools.pairwise(extents):
        assert a.end == b.start
        assert (a.zero, a.hole) != (b.zero, b.hole)
    # The allocated zeros at 5M are zero but not a hole; unwritten ranges are holes.
    at_5m = next(e for e in extents if e.start <= 5 * MiB < e.end)
    assert at_5m.zero and not at_5m.hole
    at_8m = next(e for e in extents if e.start <= 8 * MiB < e.end)
    assert at_8m.zero and at_8m.hole


@pytest.mark.parametrize("request_size", [100_000, 1 * MiB + 512, 8 * MiB])
@pytest.mark.parametrize("dst_fmt", ["qcow2", "raw"])
def test_copy_between_files(tmp_path, qcow2_image, dst_fmt, request_size):
    """A local image read from its file into a new one written in place.
    Requests that do not fall on pages mix direct and cached I/O in the same
    pages and clusters."""
    dst = str(tmp_path / f"dst.{dst_fmt}")
    with (
        _image.open_endpoint(qcow2_image, "qcow2") as src,
        _image.create_endpoint(dst, dst_fmt, src.size) as out,
    ):
        assert isinstance(src, _file.FileReader)
        stats = _copy.copy(src, out, workers=4, request_size=request_size)
    compare(qcow2_image, dst)
    # As qemu-nbd counts them (test_copy_to_new_qcow2).
    assert stats.data_bytes == 6 * MiB + 64 * 1024 + 4096
    if dst_fmt == "qcow2":
        check = _qemu_img.check(dst, fmt="qcow2")
        assert check["check-errors"] == 0
        assert check.get("leaks", 0) == 0
