# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The imageio client against the real ovirt-imageio daemon and proxy of the
lab, with tickets on qemu-nbd (format=raw transfers) and files (cow)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from ovirt_imageio import client as imageio_client

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _checksum,
    _copy,
    _file,
    _image,
    _imageio,
    _imageio_http,
    _nbd_endpoint,
    _qemu_img,
    _qemu_nbd,
)
from lab.pki import Pki
from tests.helpers import qemu_io
from tests.unit.conftest import child_pids

KiB = 1024
MiB = 1024**2

# A qcow2 with data, allocated zeros and holes at cluster boundaries; the
# size is not a multiple of 1 MiB.
IMAGE_SIZE = 20 * MiB + 64 * KiB
DATA = [
    (0, 1 * MiB, 0x11),
    (3 * MiB + 64 * KiB, 2 * MiB, 0x22),
    (12 * MiB, 3 * MiB, 0x33),
    (IMAGE_SIZE - 64 * KiB, 64 * KiB, 0x44),
]
ALLOCATED_ZEROS = [(9 * MiB, 1 * MiB)]
DATA_BYTES = sum(run[1] for run in DATA)


# Fixtures and helpers.


@pytest.fixture(autouse=True)
def no_leaks(imageio_lab):
    """Every test leaves no thread, socket or child process behind (the
    lab's own daemons and NBD servers aside)."""
    threads = set(threading.enumerate())
    sockets = _open_sockets()
    children = child_pids()
    yield
    assert set(threading.enumerate()) <= threads
    assert _open_sockets() <= sockets
    assert child_pids() - imageio_lab.processes() <= children


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("imageio") / "source.qcow2")
    _qemu_img.create(path, "qcow2", IMAGE_SIZE)
    writes = [f"write -P {pattern:#x} {start} {length}" for start, length, pattern in DATA]
    writes += [f"write -z {start} {length}" for start, length in ALLOCATED_ZEROS]
    qemu_io(path, "qcow2", *writes)
    return path


def expected_layout():
    """(start, length, zero) of the source, merged."""
    layout = []
    pos = 0
    for start, length, _pattern in DATA:
        if start > pos:
            layout.append((pos, start - pos, True))
        layout.append((start, length, False))
        pos = start + length
    if pos < IMAGE_SIZE:
        layout.append((pos, IMAGE_SIZE - pos, True))
    return layout


def layout(extents):
    """Merge extents by their zero flag only; holes depend on the format."""
    merged = []
    for ext in extents:
        if merged and merged[-1][2] == ext.zero and merged[-1][0] + merged[-1][1] == ext.start:
            start, length, zero = merged[-1]
            merged[-1] = (start, length + ext.length, zero)
        else:
            merged.append((ext.start, ext.length, ext.zero))
    return merged


def compare(a, b):
    """Both images are qcow2 and hold the same guest data."""
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b], check=True)


def endpoint(lab, ticket, **kwargs):
    kwargs.setdefault("ca_file", lab.ca_file)
    kwargs.setdefault("proxy_url", ticket.proxy_url)
    return _imageio.ImageioEndpoint(kwargs.pop("transfer_url", ticket.transfer_url), **kwargs)


def unreachable(url):
    """url with a port nothing listens on."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((parts.hostname, 0))
        port = s.getsockname()[1]
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))


def host_for(lab, route):
    return lab.local_host if route == "unix" else lab.host


def daemon_log(host):
    with open(os.path.join(host.log_dir, f"imageio-{host.name}.log")) as f:
        return f.read()


def _open_sockets():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            found.add((int(fd), target))
    return found


# Upload.


@pytest.mark.parametrize("route", ["host", "unix", "proxy"])
def test_upload(imageio_lab, make_ticket, source, route):
    ticket = make_ticket(host_for(imageio_lab, route), IMAGE_SIZE)
    transfer_url = ticket.transfer_url
    if route == "proxy":
        transfer_url = unreachable(transfer_url)
    with (
        _qemu_nbd.serve(source, fmt="qcow2") as export,
        contextlib.closing(_nbd_endpoint.NbdEndpoint(export.url, allocation_depth=True)) as src,
        endpoint(imageio_lab, ticket, transfer_url=transfer_url, is_zero=True) as dst,
    ):
        assert dst.used == route
        assert dst.url == (ticket.proxy_url if route == "proxy" else ticket.transfer_url)
        assert dst.features == _imageio_http.FEATURES
        assert dst.writable
        assert dst.max_connections == 8
        assert dst.size == IMAGE_SIZE
        stats = _copy.copy(src, dst, workers=4)
        # The same connection that asked for the map before the upload sees
        # what the upload wrote (the proxy keeps one map per connection).
        uploaded = layout(dst.extents())
        checksum = dst.checksum()
        ours = _checksum.checksum(src)
    assert stats.connections == 4
    assert stats.data_bytes == DATA_BYTES
    assert uploaded == expected_layout()
    ticket.close()
    compare(source, ticket.volume.path)
    assert checksum == imageio_client.checksum(source) == ours


def test_upload_unix_socket_never(imageio_lab, make_ticket, source):
    ticket = make_ticket(imageio_lab.local_host, IMAGE_SIZE)
    with endpoint(imageio_lab, ticket, unix_socket="never", is_zero=True) as dst:
        assert dst.used == "host"
        assert dst.local_socket is None
        clone = dst.clone()
        try:
            assert clone.used == "host"
            clone.write(0, b"\x55" * MiB)
            clone.flush()
        finally:
            clone.close()
        buf = bytearray(MiB)
        dst.readinto(0, buf)
    assert buf == b"\x55" * MiB


def test_clones_share_one_extents_request(imageio_lab, make_ticket, source):
    ticket = make_ticket(imageio_lab.host, IMAGE_SIZE, image=source)
    marker = f"EXTENTS transfer={ticket.id}"
    with endpoint(imageio_lab, ticket) as ep:
        first = list(ep.extents())
        clones = [ep.clone() for _clone in range(3)]
        try:
            for clone in clones:
                assert clone.used == "host"
                assert list(clone.extents()) == first
                assert clone.size == IMAGE_SIZE
        finally:
            for clone in clones:
                clone.close()
        assert daemon_log(imageio_lab.host).count(marker) == 1
        # A write makes the map stale: it is asked again.
        ep.write(5 * MiB + 64 * KiB, b"\x66" * (64 * KiB))
        assert layout(ep.extents())[2] == (3 * MiB + 64 * KiB, 2 * MiB + 64 * KiB, False)
        assert daemon_log(imageio_lab.host).count(marker) == 2


def test_upload_size_without_extents(imageio_lab, make_ticket):
    """A destination learns its size from a one-byte GET, not from the
    extent map the daemon would build for the whole disk."""
    ticket = make_ticket(imageio_lab.host, IMAGE_SIZE)
    marker = f"EXTENTS transfer={ticket.id}"
    with endpoint(imageio_lab, ticket, is_zero=True) as ep:
        assert ep.size == IMAGE_SIZE
        assert daemon_log(imageio_lab.host).count(marker) == 0
        assert layout(ep.extents()) == [(0, IMAGE_SIZE, True)]
        assert daemon_log(imageio_lab.host).count(marker) == 1


def test_size_of_an_empty_ticket(imageio_lab, make_ticket):
    """An empty ticket has no first byte: the size comes from the 416 reply."""
    ticket = make_ticket(imageio_lab.host, MiB, fmt="raw", backend="file")
    host = imageio_lab.host
    empty = str(uuid.uuid4())
    host.add_ticket(
        {
            "uuid": empty,
            "size": 0,
            "ops": ["write"],
            "timeout": 60,
            "url": "file://" + ticket.volume.path,
        }
    )
    try:
        with _imageio.ImageioEndpoint(
            host.transfer_url(empty), ca_file=imageio_lab.ca_file, is_zero=True
        ) as ep:
            assert ep.size == 0
    finally:
        host.remove_ticket(empty)


def test_upload_qcow2_to_file_ticket(imageio_lab, make_ticket, source):
    """A cow transfer: the qcow2 file's bytes go as they are to a file ticket,
    which allows one writer."""
    size = os.path.getsize(source)
    capacity = (size + 4 * KiB - 1) // (4 * KiB) * (4 * KiB)
    ticket = make_ticket(imageio_lab.host, capacity, fmt="raw", backend="file")
    with (
        _qemu_nbd.serve(source, fmt="raw") as export,
        contextlib.closing(_nbd_endpoint.NbdEndpoint(export.url)) as src,
        endpoint(imageio_lab, ticket, is_zero=True) as dst,
    ):
        assert dst.max_connections == 1
        # The file backend reports the whole file as data.
        assert list(dst.extents()) == [_copy.Extent(0, capacity, False, False)]
        stats = _copy.copy(src, dst, workers=4)
    assert stats.connections == 1
    ticket.close()
    compare(source, ticket.volume.path)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("route", ["host", "unix", "proxy"])
def test_upload_from_file(imageio_lab, make_ticket, source, tmp_path, monkeypatch, route, fmt):
    """A local image read from its file; on the daemon's unix socket the
    data goes from the file to the socket with sendfile(2)."""
    image = source
    if fmt == "raw":
        image = str(tmp_path / "source.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", source, image], check=True)
    sent = []
    real_sendfile = _imageio_http.sendfile

    def counting_sendfile(sock, fd, offset, count):
        n = real_sendfile(sock, fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(_imageio_http, "sendfile", counting_sendfile)
    ticket = make_ticket(host_for(imageio_lab, route), IMAGE_SIZE)
    transfer_url = ticket.transfer_url
    if route == "proxy":
        transfer_url = unreachable(transfer_url)
    with (
        _image.open_endpoint(image, None) as src,
        endpoint(imageio_lab, ticket, transfer_url=transfer_url, is_zero=True) as dst,
    ):
        assert isinstance(src, _file.FileReader)
        assert dst.can_write_from_file == (route == "unix")
        stats = _copy.copy(src, dst, workers=4, request_size=1 * MiB)
        checksum = dst.checksum()
    assert stats.data_bytes == DATA_BYTES
    assert sum(sent) == (DATA_BYTES if route == "unix" else 0)
    ticket.close()
    compare(source, ticket.volume.path)
    assert checksum == imageio_client.checksum(source)


@pytest.mark.parametrize("unix_socket", ["auto", "never"])
def test_write_from_file(imageio_lab, make_ticket, tmp_path, unix_socket):
    """From a file at any offset; over TLS (no sendfile) through memory."""
    data = os.urandom(3 * MiB)
    path = tmp_path / "data"
    path.write_bytes(data)
    ticket = make_ticket(imageio_lab.local_host, 4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        with endpoint(imageio_lab, ticket, unix_socket=unix_socket) as ep:
            assert ep.can_write_from_file == (unix_socket == "auto")
            ep.max_request = 1 * MiB
            ep.write_from_file(4 * KiB, fd, 512 * KiB, 2 * MiB + 4 * KiB)
            ep.flush()
            buf = bytearray(2 * MiB + 4 * KiB)
            ep.readinto(4 * KiB, buf)
    finally:
        os.close(fd)
    assert buf == data[512 * KiB : 512 * KiB + len(buf)]


@pytest.mark.parametrize("unix_socket", ["auto", "never"])
def test_write_from_short_file(imageio_lab, make_ticket, tmp_path, unix_socket):
    """A file ending before the range: the request fails, saying where the
    file ends, and the endpoint goes on with a new connection."""
    path = tmp_path / "short"
    path.write_bytes(b"\x07" * (64 * KiB))
    ticket = make_ticket(imageio_lab.local_host, 4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        with endpoint(imageio_lab, ticket, unix_socket=unix_socket) as ep:
            with pytest.raises(_imageio.Error) as e:
                ep.write_from_file(0, fd, 32 * KiB, 64 * KiB)
            assert e.value.status is None
            assert "the local file ends at offset 65536" in str(e.value)
            ep.write_from_file(0, fd, 0, 64 * KiB)
            ep.flush()
            buf = bytearray(64 * KiB)
            ep.readinto(0, buf)
    finally:
        os.close(fd)
    assert buf == b"\x07" * (64 * KiB)


# Download.


@pytest.mark.parametrize("route", ["host", "unix"])
def test_download(imageio_lab, make_ticket, source, tmp_path, route):
    ticket = make_ticket(host_for(imageio_lab, route), IMAGE_SIZE, ops=("read",), image=source)
    target = str(tmp_path / "download.qcow2")
    _qemu_img.create(target, "qcow2", IMAGE_SIZE)
    with endpoint(imageio_lab, ticket) as src:
        assert src.used == route
        assert not src.writable
        assert src.features == {"checksum", "extents"}
        assert src.max_connections == 8
        assert src.size == IMAGE_SIZE
        assert layout(src.extents()) == expected_layout()
        # The allocated zeros read as zeros, and are not holes.
        zeros = list(src.extents(9 * MiB, 1 * MiB))
        assert zeros == [_copy.Extent(9 * MiB, 1 * MiB, True, False)]
        with (
            _qemu_nbd.serve(target, fmt="qcow2", readonly=False) as export,
            contextlib.closing(_nbd_endpoint.NbdEndpoint(export.url, is_zero=True)) as dst,
        ):
            stats = _copy.copy(src, dst, workers=4)
    assert stats.data_bytes == DATA_BYTES
    assert stats.connections == 4
    compare(source, target)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("route", ["host", "unix"])
def test_download_to_file(imageio_lab, make_ticket, source, tmp_path, route, fmt):
    """Into a new image written in place (_file), as disk_download does."""
    ticket = make_ticket(host_for(imageio_lab, route), IMAGE_SIZE, ops=("read",), image=source)
    target = str(tmp_path / f"download.{fmt}")
    with endpoint(imageio_lab, ticket) as src:
        with _image.create_endpoint(target, fmt, src.size) as dst:
            stats = _copy.copy(src, dst, workers=4, request_size=1 * MiB)
            written = _checksum.checksum(dst)
        theirs = src.checksum()
    assert stats.data_bytes == DATA_BYTES
    subprocess.run(["qemu-img", "compare", "-q", "-F", fmt, source, target], check=True)
    if fmt == "qcow2":
        result = _qemu_img.check(target, fmt="qcow2")
        assert result["check-errors"] == 0
        assert result.get("leaks", 0) == 0
    assert written == theirs == imageio_client.checksum(source)


def test_extents_window(imageio_lab, make_ticket, source):
    ticket = make_ticket(imageio_lab.host, IMAGE_SIZE, ops=("read",), image=source)
    with endpoint(imageio_lab, ticket) as ep:
        whole = list(ep.extents())
        assert whole[0].start == 0
        assert whole[-1].end == IMAGE_SIZE
        # Windows starting and ending inside extents cover exactly what was asked.
        start, length = 512 * KiB, 13 * MiB
        window = list(ep.extents(start, length))
        assert window[0].start == start
        assert window[-1].end == start + length
        assert all(a.end == b.start for a, b in itertools.pairwise(window))
        assert list(ep.extents(IMAGE_SIZE - 4 * KiB)) == [
            _copy.Extent(IMAGE_SIZE - 4 * KiB, 4 * KiB, False, False)
        ]
        assert list(ep.extents(IMAGE_SIZE)) == []


def test_requests_are_split(imageio_lab, make_ticket):
    ticket = make_ticket(imageio_lab.host, 8 * MiB)
    data = os.urandom(5 * MiB + 4 * KiB)
    with endpoint(imageio_lab, ticket) as ep:
        ep.max_request = 1 * MiB
        ep.write(4 * KiB, data)
        ep.flush()
        buf = bytearray(len(data))
        ep.readinto(4 * KiB, memoryview(buf))
    assert buf == data


# Checksums and servers without optional features.


@pytest.mark.parametrize(
    "algorithm, block_size", [("blake2b", 4 * MiB), ("sha256", 1 * MiB), ("blake2s", 16 * MiB)]
)
def test_checksum(imageio_lab, make_ticket, source, algorithm, block_size):
    ticket = make_ticket(imageio_lab.host, IMAGE_SIZE, ops=("read",), image=source)
    with endpoint(imageio_lab, ticket) as ep:
        theirs = ep.checksum(algorithm, block_size)
        ours = _checksum.checksum(ep, algorithm, block_size)
    assert theirs == ours
    assert theirs == imageio_client.checksum(source, algorithm=algorithm, block_size=block_size)


def test_checksum_bad_block_size(imageio_lab, make_ticket):
    ticket = make_ticket(imageio_lab.host, 4 * MiB, ops=("read",))
    with endpoint(imageio_lab, ticket) as ep:
        with pytest.raises(_imageio.Error) as e:
            ep.checksum(block_size=1000)
        assert e.value.status == 400
        assert "/checksum?algorithm=blake2b&block_size=1000" in str(e.value)
        assert "block_size" in str(e.value)
        # The connection is still good.
        assert ep.checksum()["algorithm"] == "blake2b"


def test_server_without_optional_features(imageio_lab, make_ticket, source, tmp_path):
    """Daemons before OPTIONS features: size from a GET, no extents, zeros
    sent with PUT, every PUT flushed by the server."""
    ticket = make_ticket(imageio_lab.host, IMAGE_SIZE, image=source)
    with endpoint(imageio_lab, ticket) as ep:
        ep.features = frozenset()
        assert ep.size == IMAGE_SIZE
        assert list(ep.extents()) == [_copy.Extent(0, IMAGE_SIZE, False, False)]
        ep.zero(512 * KiB, 3 * MiB)
        ep.write(IMAGE_SIZE - 4 * KiB, b"\x77" * (4 * KiB))
        ep.flush()
        with pytest.raises(_imageio.Error, match="does not support checksums"):
            ep.checksum()
    ticket.close()
    expected = str(tmp_path / "expected.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", source, expected], check=True)
    qemu_io(
        expected,
        "qcow2",
        f"write -z {512 * KiB} {3 * MiB}",
        f"write -P 0x77 {IMAGE_SIZE - 4 * KiB} 4k",
    )
    compare(expected, ticket.volume.path)


def test_zero_larger_than_one_request(imageio_lab, make_ticket):
    """Zeroing goes in 128 MiB steps; data at both ends shows every step
    covered its part."""
    size = 2 * _imageio.MAX_ZERO + 44 * MiB
    ticket = make_ticket(imageio_lab.host, size)
    with endpoint(imageio_lab, ticket) as ep:
        ep.write(0, b"\x12" * MiB)
        ep.write(_imageio.MAX_ZERO, b"\x12" * MiB)
        ep.write(size - MiB, b"\x12" * MiB)
        assert [ext[2] for ext in layout(ep.extents())] == [False, True, False, True, False]
        ep.zero(0, size)
        ep.flush()
        assert layout(ep.extents()) == [(0, size, True)]


# Errors.


def test_wrong_ticket(imageio_lab):
    host = imageio_lab.host
    transfer_url = host.transfer_url("no-such-ticket")
    with pytest.raises(_imageio.Error) as e:
        _imageio.ImageioEndpoint(
            transfer_url, host.proxy_url("no-such-ticket"), ca_file=imageio_lab.ca_file
        )
    assert e.value.status == 403
    message = str(e.value)
    assert message.startswith(f"OPTIONS {transfer_url}: 403 Forbidden: ")
    assert message.endswith("No such ticket no-such-ticket")
    # An answer from the host is final: the proxy was not tried.
    assert "proxy" not in message


def test_ticket_removed_during_transfer(imageio_lab, make_ticket):
    ticket = make_ticket(imageio_lab.host, 4 * MiB)
    with endpoint(imageio_lab, ticket) as ep:
        ep.write(0, b"\x01" * MiB)
        ticket.remove()
        with pytest.raises(_imageio.Error) as e:
            ep.write(MiB, b"\x02" * MiB)
    assert e.value.status == 403
    message = str(e.value)
    assert message.startswith(f"PUT {ticket.transfer_url}?flush=n: 403 Forbidden: ")
    assert message.endswith(f"No such ticket {ticket.id}")


def test_read_only_ticket_refuses_writes(imageio_lab, make_ticket):
    ticket = make_ticket(imageio_lab.host, 4 * MiB, ops=("read",))
    with endpoint(imageio_lab, ticket) as ep:
        with pytest.raises(_imageio.Error) as e:
            ep.write(0, b"\x01" * MiB)
        assert e.value.status == 403
        assert "forbids write" in str(e.value)
        # The refusal closed the connection; the endpoint goes on with a new one.
        buf = bytearray(MiB)
        ep.readinto(0, buf)
    assert buf == bytes(MiB)


@pytest.mark.parametrize("ca", ["other CA", "system CAs"])
def test_untrusted_certificate(imageio_lab, make_ticket, tmp_path, ca):
    ticket = make_ticket(imageio_lab.host, 4 * MiB)
    ca_file = Pki(str(tmp_path / "other-ca")).ca_cert if ca == "other CA" else None
    with pytest.raises(_imageio.Error) as e:
        endpoint(imageio_lab, ticket, ca_file=ca_file)
    assert e.value.status is None
    message = str(e.value)
    # Both URLs were tried, and both name the certificate problem.
    assert f"host {ticket.transfer_url}: certificate verification failed" in message
    assert f"proxy {ticket.proxy_url}: certificate verification failed" in message
    assert "give ca_file" in message


def test_insecure(imageio_lab, make_ticket):
    ticket = make_ticket(imageio_lab.host, 4 * MiB)
    with endpoint(imageio_lab, ticket, ca_file=None, insecure=True) as ep:
        assert ep.used == "host"
        ep.write(0, b"\x03" * MiB)
        buf = bytearray(MiB)
        ep.readinto(0, buf)
    assert buf == b"\x03" * MiB


def test_nothing_listening(imageio_lab):
    transfer_url = unreachable("https://127.0.0.2:1/images/ticket")
    proxy_url = unreachable("https://127.0.0.1:1/images/ticket")
    with pytest.raises(_imageio.Error) as e:
        _imageio.ImageioEndpoint(transfer_url, proxy_url, ca_file=imageio_lab.ca_file)
    assert e.value.status is None
    assert str(e.value) == (
        f"Cannot reach imageio: host {transfer_url}: [Errno 111] Connection refused; "
        f"proxy {proxy_url}: [Errno 111] Connection refused"
    )
    with pytest.raises(_imageio.Error, match=r"^Cannot reach imageio: host [^;]*refused$"):
        _imageio.ImageioEndpoint(transfer_url, ca_file=imageio_lab.ca_file)


def test_host_not_answering_falls_back_to_proxy(imageio_lab, make_ticket):
    """A host that accepts connections and never answers (TLS handshake
    timeout) is unreachable too."""
    ticket = make_ticket(imageio_lab.host, 4 * MiB)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.2", 0))
        silent.listen()
        port = silent.getsockname()[1]
        transfer_url = f"https://127.0.0.2:{port}/images/{ticket.id}"
        start = time.monotonic()
        with endpoint(imageio_lab, ticket, transfer_url=transfer_url, connect_timeout=0.5) as ep:
            assert ep.used == "proxy"
            assert 0.5 <= time.monotonic() - start < 5
            ep.write(0, b"\x04" * MiB)


@pytest.mark.parametrize("length", [4 * KiB, 8 * MiB])
def test_write_past_end(imageio_lab, make_ticket, length):
    """The server refuses the range; a large body is refused before it is
    read, and the answer still comes through."""
    ticket = make_ticket(imageio_lab.host, 4 * MiB)
    with endpoint(imageio_lab, ticket) as ep:
        with pytest.raises(_imageio.Error) as e:
            ep.write(4 * MiB - 2 * KiB, b"\x05" * length)
        assert e.value.status == 416
        assert str(e.value) == (
            f"PUT {ticket.transfer_url}?flush=n: 416 Requested Range Not Satisfiable: "
            f"Requested range out of allowed range"
        )
        with pytest.raises(_imageio.Error) as e:
            ep.readinto(4 * MiB - 2 * KiB, bytearray(4 * KiB))
        assert e.value.status == 416
        assert str(e.value).startswith(f"GET {ticket.transfer_url}: 416 ")
        with pytest.raises(_imageio.Error) as e:
            ep.zero(4 * MiB - 2 * KiB, 4 * KiB)
        assert e.value.status == 416
        assert str(e.value).startswith(f"PATCH {ticket.transfer_url}: 416 ")
        # The endpoint is still good.
        ep.write(4 * MiB - 4 * KiB, b"\x05" * (4 * KiB))
        buf = bytearray(4 * KiB)
        ep.readinto(4 * MiB - 4 * KiB, buf)
    assert buf == b"\x05" * (4 * KiB)


@pytest.mark.parametrize("route", ["host", "unix"])
def test_daemon_restart(imageio_lab, make_ticket, source, route):
    """Every request survives a restart of the daemon between two requests:
    it is sent again on a new connection."""
    host = host_for(imageio_lab, route)
    ticket = make_ticket(host, IMAGE_SIZE, image=source)
    with endpoint(imageio_lab, ticket) as ep:
        buf = bytearray(MiB)
        ep.readinto(0, buf)
        host.restart_imageio()
        buf[:] = bytes(MiB)
        ep.readinto(0, buf)
        assert buf == b"\x11" * MiB
        assert ep.used == route

        host.restart_imageio()
        ep.flush()

        host.restart_imageio()
        assert ep.checksum() == imageio_client.checksum(source)

        host.restart_imageio()
        clone = ep.clone()
        try:
            assert clone.used == route
            clone.readinto(0, buf)
        finally:
            clone.close()

        host.restart_imageio()
        ep.write(0, b"\x99" * MiB)
        host.restart_imageio()
        ep.zero(MiB, MiB)
        ep.flush()
        ep.readinto(0, buf)
        assert buf == b"\x99" * MiB
        ep.readinto(MiB, buf)
        assert buf == bytes(MiB)


@pytest.mark.parametrize("route", ["host", "unix"])
def test_daemon_down_for_a_while(imageio_lab, make_ticket, source, route):
    """A request made while the daemon is down is sent again until it comes
    back, and the retry is told; one that outlasts retry_timeout fails,
    saying how often it was sent."""
    host = host_for(imageio_lab, route)
    ticket = make_ticket(host, IMAGE_SIZE, image=source)
    with endpoint(imageio_lab, ticket, retry_timeout=30) as ep:
        buf = bytearray(MiB)
        ep.readinto(0, buf)
        host.stop_imageio()
        starter = threading.Timer(1.5, host.start_imageio)
        starter.start()
        try:
            start = time.monotonic()
            ep.write(0, b"\x42" * MiB)
            assert time.monotonic() - start >= 1.5
        finally:
            starter.join()
        ep.readinto(0, buf)
        assert buf == b"\x42" * MiB
        (line,) = ep.retries
        assert line.startswith(f"PUT {ticket.transfer_url}?flush=n")
        assert "succeeded when sent again" in line

        ep.retry_timeout = 1
        host.stop_imageio()
        try:
            with pytest.raises(_imageio.Error) as e:
                ep.readinto(0, buf)
        finally:
            host.start_imageio()
        assert e.value.status is None
        assert "cannot connect" in str(e.value)
        assert re.search(r"\(sent \d+ times in 1\.\d s\)$", str(e.value)), str(e.value)
        assert len(ep.retries) == 2 and "gave up" in ep.retries[1]


def test_reply_timeout(imageio_lab, make_ticket, source):
    host = imageio_lab.host
    host.slow_storage(1500)
    try:
        ticket = make_ticket(host, IMAGE_SIZE, ops=("read",), image=source)
    finally:
        host.slow_storage(0)
    with endpoint(imageio_lab, ticket, timeout=0.5) as ep:
        with pytest.raises(_imageio.Error) as e:
            ep.readinto(0, bytearray(64 * KiB))
        assert e.value.status is None
        assert str(e.value) == f"GET {ticket.transfer_url}: no reply within 0.5 s"
        with pytest.raises(_imageio.Error) as e:
            ep.checksum(timeout=0.2)
        assert str(e.value).endswith(": no reply within 0.2 s")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transfer_url": ""}, "No transfer_url"),
        (
            {"transfer_url": "ftp://127.0.0.2/images/t"},
            "Invalid transfer URL 'ftp://127.0.0.2/images/t': use https://",
        ),
        ({"transfer_url": "https://127.0.0.2:99999/images/t"}, "Invalid transfer URL"),
        (
            {"transfer_url": "https://127.0.0.2/images/t", "proxy_url": "localhost:54323"},
            "Invalid proxy URL 'localhost:54323'",
        ),
        (
            {"transfer_url": "https://127.0.0.2/images/t", "unix_socket": "always"},
            "Invalid unix_socket 'always': use auto or never",
        ),
        (
            {"transfer_url": "https://127.0.0.2/images/t", "ca_file": "/nonexistent/ca.pem"},
            "Cannot load CA certificates from '/nonexistent/ca.pem'",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(_imageio.Error) as e:
        _imageio.ImageioEndpoint(**kwargs)
    assert e.value.status is None
    assert str(e.value).startswith(message)
