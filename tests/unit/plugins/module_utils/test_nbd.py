# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The NBD client against real servers: qemu-nbd and nbdkit."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import _nbd, _nbd_wire
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd import Client
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_url import (
    Address,
    format_url,
    parse_url,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    BASE_ALLOCATION,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    QEMU_ALLOCATION_DEPTH,
)
from tests.unit.conftest import child_pids, free_port, open_fds

KiB = 1024
MiB = 1024**2

# A client dropped without close() shows up as an unclosed socket.
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

IMAGE_SIZE = 4 * MiB
CLUSTER = 64 * KiB  # qcow2 default cluster size


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every test leaves no server process and no open socket or file."""
    children = child_pids()
    fds = open_fds()
    yield
    assert child_pids() - children == set(), "a server process was left running"
    leaked = {fd: target for fd, target in open_fds().items() if fds.get(fd) != target}
    assert not leaked, f"file descriptors left open: {leaked}"


def pattern(seed, size):
    """size bytes that differ for every seed and every 8-byte word."""
    word = seed.to_bytes(4, "big")
    return b"".join(word + i.to_bytes(4, "big") for i in range(size // 8))


def create_image(path, fmt, size=IMAGE_SIZE, *options):
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *options, str(path), str(size)], check=True
    )
    return str(path)


def qemu_io(image, fmt, *commands):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, stdout=subprocess.DEVNULL)


def qemu_img_compare(a, b, fmt_a=None, fmt_b=None):
    args = ["qemu-img", "compare"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    result = subprocess.run([*args, str(a), str(b)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def flags_at(extents, offset):
    """The flags of the extent covering offset, from a list of (length, flags)."""
    start = 0
    for length, flags in extents:
        if start <= offset < start + length:
            return flags
        start += length
    raise AssertionError(f"offset {offset} not covered by {extents}")


def all_extents(client, context=BASE_ALLOCATION):
    """The extents of the whole export, asking again after short replies."""
    result = []
    offset = 0
    while offset < client.export_size:
        for length, flags in client.extents(offset, client.export_size - offset)[context]:
            length = min(length, client.export_size - offset)
            result.append((length, flags))
            offset += length
            if offset >= client.export_size:
                break
    return result


def wait_for_log(server, text, count=1, timeout=5):
    """Wait until the server logged text count times; it logs after replying."""
    deadline = time.monotonic() + timeout
    while server.stderr().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times"
        time.sleep(0.02)


# URLs


@pytest.mark.parametrize(
    "url,expected",
    [
        ("nbd://example.com", Address("tcp", host="example.com", port=10809)),
        ("nbd://example.com/", Address("tcp", host="example.com", port=10809)),
        ("nbd://127.0.0.1:1234/disk", Address("tcp", host="127.0.0.1", port=1234, export="disk")),
        ("nbd://h//disk", Address("tcp", host="h", port=10809, export="/disk")),
        ("nbd://h/hello%20world", Address("tcp", host="h", port=10809, export="hello world")),
        ("nbd://h/a+b", Address("tcp", host="h", port=10809, export="a+b")),
        ("nbd://h/%D0%B4%D0%B8%D1%81%D0%BA", Address("tcp", host="h", port=10809, export="диск")),
        ("nbd://[::1]:2000/x", Address("tcp", host="::1", port=2000, export="x")),
        ("nbd://[fe80::1]/", Address("tcp", host="fe80::1", port=10809)),
        ("nbds://h:1/e", Address("tcp", host="h", port=1, export="e", tls=True)),
        ("NBD://h:1/e", Address("tcp", host="h", port=1, export="e")),
        ("nbd+unix:///?socket=/run/x.sock", Address("unix", path="/run/x.sock")),
        ("nbd+unix:///e?socket=/run/x.sock", Address("unix", path="/run/x.sock", export="e")),
        ("nbd+unix:///e?socket=/a%20b/x+y.sock", Address("unix", path="/a b/x+y.sock", export="e")),
        ("nbd+unix:///?socket=relative.sock", Address("unix", path="relative.sock")),
        ("nbds+unix:///e?socket=/s", Address("unix", path="/s", export="e", tls=True)),
        ("nbd:unix:/run/x.sock", Address("unix", path="/run/x.sock")),
        ("nbd:unix:/run/x.sock:exportname=e", Address("unix", path="/run/x.sock", export="e")),
        ("nbd:unix:/a:b.sock:exportname=x:y", Address("unix", path="/a:b.sock", export="x:y")),
        ("nbd:localhost:10810", Address("tcp", host="localhost", port=10810)),
        (
            "nbd:10.0.0.1:10809:exportname=sda",
            Address("tcp", host="10.0.0.1", port=10809, export="sda"),
        ),
        ("nbd:[::1]:10809:exportname=a b", Address("tcp", host="::1", port=10809, export="a b")),
    ],
)
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url,canonical",
    [
        ("nbd://example.com", "nbd://example.com:10809/"),
        ("nbd://h:1//disk", "nbd://h:1//disk"),
        ("nbd://[::1]:2000/x", "nbd://[::1]:2000/x"),
        ("nbds://h:1/hello%20world", "nbds://h:1/hello%20world"),
        ("nbd://h:1/%D0%B4", "nbd://h:1/%D0%B4"),
        ("nbd+unix:///e?socket=/run/x.sock", "nbd+unix:///e?socket=/run/x.sock"),
        ("nbds+unix:///?socket=/a%20b", "nbds+unix:///?socket=/a%20b"),
        ("nbd:unix:/run/x.sock:exportname=a b", "nbd+unix:///a%20b?socket=/run/x.sock"),
        ("nbd:localhost:10810", "nbd://localhost:10810/"),
    ],
)
def test_format_url(url, canonical):
    assert format_url(url) == canonical
    assert str(parse_url(url)) == canonical
    assert parse_url(canonical) == parse_url(url)


@pytest.mark.parametrize(
    "url,problem",
    [
        ("", "unsupported scheme ''"),
        ("/var/tmp/disk.img", "unsupported scheme ''"),
        ("http://h/x", "unsupported scheme 'http'"),
        ("nbd://", "missing host"),
        ("nbd://:10809/x", "missing host"),
        ("nbd://h:0/", "invalid port '0'"),
        ("nbd://h:65536/", "invalid port '65536'"),
        ("nbd://h:port/", "invalid port 'port'"),
        ("nbd://user@h/", "user names are not supported"),
        ("nbd://h/x?socket=/s", "unsupported query parameter 'socket'"),
        ("nbd://h/x#frag", "unexpected fragment"),
        ("nbd://h/x%00y", "contains a NUL character"),
        ("nbd://h/%ff", "export name is not UTF-8"),
        ("nbd://h/a b", "white space"),
        ("nbd://[::1/", "IPv6"),
        ("nbd+unix:///x", "missing socket path"),
        ("nbd+unix:///x?socket=", "missing socket path"),
        ("nbd+unix://host/x?socket=/s", "names no host"),
        ("nbd+unix:///x?socket=/s&tls=1", "unsupported query parameter 'tls'"),
        ("nbd+unix:///x?socket=/s&socket=/t", "'socket' repeated"),
        ("nbd+unix:///x?socket", "'socket' has no value"),
        ("nbd:", "missing HOST:PORT"),
        ("nbd:localhost", "missing port"),
        ("nbd:localhost:", "invalid port ''"),
        ("nbd:::1:10809", "write IPv6 addresses in brackets"),
        ("nbd:unix:", "missing socket path"),
        ("nbd:unix::exportname=x", "missing socket path"),
        ("nbd://h/" + "x" * 4097, "longer than 4096 bytes"),
    ],
)
def test_parse_url_errors(url, problem):
    with pytest.raises(ValueError) as e:
        parse_url(url)
    message = str(e.value)
    assert problem in message
    assert repr(url)[:60] in message or url == ""


def test_parse_url_not_a_string():
    with pytest.raises(ValueError, match="must be a string"):
        parse_url(None)


def test_address_is_immutable_and_validated():
    address = Address("unix", path="/s", export="a")
    with pytest.raises(AttributeError):
        address.export = "b"
    assert address.with_export("b") == Address("unix", path="/s", export="b")
    assert address == parse_url(str(address))
    with pytest.raises(ValueError, match="transport must be"):
        Address("vsock", path="/s")
    with pytest.raises(ValueError, match="needs host and port"):
        Address("tcp", host="h")
    with pytest.raises(ValueError, match="needs a socket path"):
        Address("unix", host="h", path="/s")
    with pytest.raises(ValueError, match="out of range"):
        Address("tcp", host="h", port=70000)


# qemu-nbd: data round trips


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_round_trip(tmp_path, nbd_servers, fmt, transport):
    image = create_image(tmp_path / f"disk.{fmt}", fmt)
    server = nbd_servers.qemu_nbd(image, fmt, "--discard=unmap", transport=transport)
    expected = bytearray(IMAGE_SIZE)

    def write(offset, data, **kwargs):
        client.write(offset, data, **kwargs)
        expected[offset : offset + len(data)] = data

    def zero(offset, length, **kwargs):
        client.zero(offset, length, **kwargs)
        expected[offset : offset + length] = bytes(length)

    with Client(server.url) as client:
        assert client.export_size == IMAGE_SIZE
        assert not client.is_read_only
        assert client.can_flush and client.can_fua and client.can_zero and client.can_trim
        assert client.structured_replies
        assert client.contexts == {BASE_ALLOCATION: client.contexts[BASE_ALLOCATION]}

        write(0, pattern(1, 1 * MiB))
        write(1 * MiB + 512, pattern(2, 8 * KiB), fua=True)
        write(3 * MiB - 4 * KiB, pattern(3, 12 * KiB))
        write(2 * MiB, memoryview(pattern(4, 256 * KiB)))
        zero(256 * KiB, 128 * KiB)
        zero(512 * KiB, 64 * KiB, punch_hole=False)
        # Unmapped whole clusters read as zeros with --discard=unmap.
        client.trim(2 * MiB, 256 * KiB)
        expected[2 * MiB : 2 * MiB + 256 * KiB] = bytes(256 * KiB)
        client.flush()

        assert client.read(0, IMAGE_SIZE) == expected
        buf = bytearray(b"\xff" * 4 * KiB)
        assert client.readinto(1 * MiB + 512, buf) == 4 * KiB
        assert buf == expected[1 * MiB + 512 : 1 * MiB + 512 + 4 * KiB]
        assert client.read(IMAGE_SIZE, 0) == b""

    nbd_servers.stop_all()
    reference = tmp_path / "expected.raw"
    reference.write_bytes(expected)
    qemu_img_compare(image, reference, fmt, "raw")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_extents_base_allocation(tmp_path, nbd_servers, fmt):
    image = create_image(tmp_path / f"disk.{fmt}", fmt)
    server = nbd_servers.qemu_nbd(image, fmt)
    with Client(server.url) as client:
        client.write(0, pattern(1, 1 * MiB))
        client.write(2 * MiB, pattern(2, 1 * MiB))
        client.zero(2 * MiB, 256 * KiB)
        client.zero(2 * MiB + 512 * KiB, 256 * KiB, punch_hole=False)
        client.flush()

        extents = all_extents(client)
        assert sum(length for length, _flags in extents) == IMAGE_SIZE
        assert flags_at(extents, 0) == 0
        assert flags_at(extents, 1 * MiB - 1) == 0
        assert flags_at(extents, 1 * MiB) == NBD_STATE_HOLE | NBD_STATE_ZERO
        assert flags_at(extents, 2 * MiB) == NBD_STATE_HOLE | NBD_STATE_ZERO
        assert flags_at(extents, 2 * MiB + 256 * KiB) == 0
        assert flags_at(extents, 3 * MiB) == NBD_STATE_HOLE | NBD_STATE_ZERO

        # The reply starts at the offset asked for, and may stop short.
        reply = client.extents(1 * MiB, 4 * KiB)
        assert list(reply) == [BASE_ALLOCATION]
        assert reply[BASE_ALLOCATION][0][1] == NBD_STATE_HOLE | NBD_STATE_ZERO
        assert sum(length for length, _flags in reply[BASE_ALLOCATION]) >= 4 * KiB

    if fmt == "qcow2":
        # NBD reports every zero cluster as a hole; the image shows that the
        # zero written with punch_hole=False kept its cluster allocated.
        nbd_servers.stop_all()
        result = subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", fmt, image],
            check=True,
            capture_output=True,
        )
        mapping = json.loads(result.stdout)

        def allocated(offset):
            (entry,) = [e for e in mapping if e["start"] <= offset < e["start"] + e["length"]]
            return entry["zero"], "offset" in entry

        assert allocated(2 * MiB) == (True, False)
        assert allocated(2 * MiB + 512 * KiB) == (True, True)
        assert allocated(0) == (False, True)


def test_sparse_reads_fill_holes_with_zeros(tmp_path, nbd_servers):
    # qemu-nbd answers reads of holes with NBD_REPLY_TYPE_OFFSET_HOLE chunks
    # between data chunks; the buffer starts as 0xff so a missed hole shows.
    image = create_image(tmp_path / "disk.qcow2", "qcow2")
    qemu_io(image, "qcow2", "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 3M 1M")
    server = nbd_servers.qemu_nbd(image, "qcow2", "--read-only")
    with Client(server.url) as client:
        assert client.is_read_only
        buf = bytearray(b"\xff" * IMAGE_SIZE)
        client.readinto(0, buf)
    expected = bytearray(IMAGE_SIZE)
    expected[0 : 64 * KiB] = b"\x11" * 64 * KiB
    expected[1 * MiB : 1 * MiB + 64 * KiB] = b"\x22" * 64 * KiB
    expected[3 * MiB :] = b"\x33" * MiB
    assert buf == expected


def test_allocation_depth(tmp_path, nbd_servers):
    base = create_image(tmp_path / "base.qcow2", "qcow2")
    qemu_io(base, "qcow2", "write -P 0x0b 0 1M")
    top = create_image(tmp_path / "top.qcow2", "qcow2", IMAGE_SIZE, "-b", base, "-F", "qcow2")
    qemu_io(top, "qcow2", "write -P 0x0c 2M 1M")
    server = nbd_servers.qemu_nbd(top, "qcow2", "--read-only", "--allocation-depth")
    contexts = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH)
    with Client(server.url, meta_contexts=contexts) as client:
        assert set(client.contexts) == set(contexts)
        depth = all_extents(client, QEMU_ALLOCATION_DEPTH)
        assert flags_at(depth, 0) == 2  # in the backing file
        assert flags_at(depth, 1 * MiB) == 0  # nowhere in the chain
        assert flags_at(depth, 2 * MiB) == 1  # in the top image
        assert flags_at(depth, 3 * MiB) == 0
        reply = client.extents(0, IMAGE_SIZE, contexts=[QEMU_ALLOCATION_DEPTH])
        assert list(reply) == [QEMU_ALLOCATION_DEPTH]
        assert client.read(0, 4) == b"\x0b" * 4
        assert client.read(2 * MiB, 4) == b"\x0c" * 4


def test_dirty_bitmap(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.qcow2", "qcow2")
    qemu_io(image, "qcow2", "write -P 0x01 0 4M")
    subprocess.run(["qemu-img", "bitmap", "--add", image, "b0"], check=True)
    server = nbd_servers.qemu_nbd(image, "qcow2", "--bitmap=b0")
    dirty = "qemu:dirty-bitmap:b0"
    with Client(server.url, meta_contexts=(BASE_ALLOCATION, dirty)) as client:
        assert dirty in client.contexts
        assert all_extents(client, dirty) == [(IMAGE_SIZE, 0)]
        client.write(1 * MiB, pattern(1, 64 * KiB))
        client.write(3 * MiB + 4 * KiB, pattern(2, 4 * KiB))
        extents = all_extents(client, dirty)
        assert flags_at(extents, 0) == 0
        assert flags_at(extents, 1 * MiB) == NBD_STATE_DIRTY
        assert flags_at(extents, 1 * MiB + 64 * KiB) == 0
        assert flags_at(extents, 3 * MiB + 4 * KiB) == NBD_STATE_DIRTY
        assert sum(length for length, flags in extents if flags & NBD_STATE_DIRTY) == 2 * CLUSTER


def test_missing_meta_contexts_are_absent(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image)
    wanted = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, "qemu:dirty-bitmap:nope")
    with Client(server.url, meta_contexts=wanted) as client:
        assert list(client.contexts) == [BASE_ALLOCATION]
        with pytest.raises(_nbd.RequestError, match="'qemu:allocation-depth' was not negotiated"):
            client.extents(0, IMAGE_SIZE, contexts=[QEMU_ALLOCATION_DEPTH])
        reply = client.extents(1 * MiB, 1 * MiB)
        assert reply[BASE_ALLOCATION] == [(1 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]
    with Client(server.url, meta_contexts=()) as client:
        assert client.contexts == {}
        with pytest.raises(_nbd.RequestError, match="no metadata context"):
            client.extents(0, IMAGE_SIZE)
        assert client.read(0, 4) == bytes(4)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_non_ascii_export_name(tmp_path, nbd_servers, transport):
    export = "диск ñ€/1"
    image = create_image(tmp_path / "disk.raw", "raw")
    qemu_io(image, "raw", "write -P 0x5a 0 64k")
    server = nbd_servers.qemu_nbd(image, transport=transport, export=export)
    url = server.url
    assert "%D0%B4" in url
    with Client(url) as client:
        assert client.address.export == export
        assert client.read(0, 64 * KiB) == b"\x5a" * 64 * KiB
    # The same export chosen with export= over a URL naming another one.
    with Client(url.replace("%D0%B4", "x", 1), export=export) as client:
        assert client.url == url
        assert client.read(0, 4) == b"\x5a" * 4


def test_pipelined_writes_and_reads(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.qcow2", "qcow2")
    server = nbd_servers.qemu_nbd(image, "qcow2")
    count, size = 64, 64 * KiB  # the whole image
    with Client(server.url) as client:
        # More requests than the client keeps in flight at once.
        writes = [client.submit_write(i * size, pattern(i, size)) for i in range(count)]
        for handle in reversed(writes[count // 2 :]):
            client.wait(handle)
        client.wait_all()
        zero = client.submit_zero(0, size)
        client.wait(zero)

        buffers = [bytearray(size) for _round in range(count)]
        reads = [client.submit_read(i * size, buffers[i]) for i in range(count)]
        for i in (5, 63, 0, 17):
            client.wait(reads[i])
        client.wait_all()
        with pytest.raises(ValueError, match="unknown or already completed handle"):
            client.wait(reads[5])

    assert buffers[0] == bytes(size)
    for i in range(1, count):
        assert buffers[i] == pattern(i, size), f"request {i}"
    nbd_servers.stop_all()
    reference = tmp_path / "expected.raw"
    reference.write_bytes(bytes(size) + b"".join(pattern(i, size) for i in range(1, count)))
    qemu_img_compare(image, reference, "qcow2", "raw")


def test_multi_conn(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.raw", "raw")
    single = nbd_servers.qemu_nbd(image)
    with Client(single.url) as client:
        assert not client.can_multi_conn
    nbd_servers.stop_all()

    shared = nbd_servers.qemu_nbd(image, "raw", "--shared=4")
    with Client(shared.url) as a, Client(shared.url) as b:
        assert a.can_multi_conn and b.can_multi_conn
        a.write(0, pattern(7, 64 * KiB))
        a.flush()
        assert b.read(0, 64 * KiB) == pattern(7, 64 * KiB)


def test_large_requests_are_split(nbd_servers):
    # The server advertises 64 KiB requests at most and rejects larger ones.
    server = nbd_servers.nbdkit(
        "memory",
        "size=4M",
        "blocksize-minimum=4K",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",
        filters=["blocksize-policy"],
    )
    data = pattern(3, 1 * MiB)
    with Client(server.url) as client:
        assert client.minimum_block_size == 4 * KiB
        assert client.maximum_block_size == 64 * KiB
        client.write(1 * MiB, data)
        assert client.read(1 * MiB, 1 * MiB) == data
        client.zero(1 * MiB, 512 * KiB)
        assert client.read(1 * MiB, 1 * MiB) == bytes(512 * KiB) + data[512 * KiB :]

        with pytest.raises(_nbd.RequestError, match="not aligned") as e:
            client.read(512, 4 * KiB)
        assert e.value.errno == _nbd_wire.NBD_EINVAL
        with pytest.raises(_nbd.RequestError, match="past the end of the export"):
            client.write(4 * MiB - 4 * KiB, bytes(8 * KiB))
        assert client.read(4 * MiB - 4 * KiB, 4 * KiB) == bytes(4 * KiB)


# TLS


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_tls_round_trip(tmp_path, nbd_servers, tls_certs, transport):
    image = create_image(tmp_path / "disk.qcow2", "qcow2")
    server = nbd_servers.qemu_nbd(image, "qcow2", transport=transport, tls_dir=tls_certs.server)
    assert server.url.startswith("nbds")
    data = pattern(9, 1 * MiB)
    with Client(server.url, tls_certs=tls_certs.client) as client:
        assert client.tls
        client.write(1 * MiB, data)
        buffers = [bytearray(64 * KiB) for _round in range(16)]
        for i, buf in enumerate(buffers):
            client.submit_read(1 * MiB + i * 64 * KiB, buf)
        client.wait_all()
        assert b"".join(buffers) == data
        assert client.extents(0, IMAGE_SIZE)[BASE_ALLOCATION][0] == (
            1 * MiB,
            NBD_STATE_HOLE | NBD_STATE_ZERO,
        )
    nbd_servers.stop_all()
    reference = tmp_path / "expected.raw"
    reference.write_bytes(bytes(1 * MiB) + data + bytes(2 * MiB))
    qemu_img_compare(image, reference, "qcow2", "raw")


def test_tls_url_scheme_with_plain_url_and_certs(tmp_path, nbd_servers, tls_certs):
    # tls_certs alone turns TLS on for an nbd+unix URL.
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, tls_dir=tls_certs.server)
    plain_url = server.url.replace("nbds+unix", "nbd+unix")
    with Client(plain_url, tls_certs=tls_certs.client) as client:
        assert client.tls
        assert client.read(0, 4) == bytes(4)


def test_tls_untrusted_server(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, transport="tcp", tls_dir=tls_certs.server)
    fds = open_fds()
    with pytest.raises(_nbd.ProtocolError, match="certificate verify failed") as e:
        Client(server.url, tls_certs=tls_certs.rogue)
    assert server.url in str(e.value)
    assert not isinstance(e.value, _nbd.OptionError)
    assert open_fds() == fds


def test_tls_hostname(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, transport="tcp", tls_dir=tls_certs.server)
    with pytest.raises(_nbd.ProtocolError, match=r"certificate verify failed.*[Hh]ostname"):
        Client(server.url, tls_certs=tls_certs.client, tls_hostname="other.example.com")
    with Client(server.url, tls_certs=tls_certs.client, tls_hostname="localhost") as client:
        assert client.read(0, 4) == bytes(4)
    with Client(server.url, tls_certs=tls_certs.client, tls_hostname="") as client:
        assert client.read(0, 4) == bytes(4)


def test_tls_server_requires_client_certificate(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, tls_dir=tls_certs.server)
    with pytest.raises(_nbd.ProtocolError, match=r"client-cert.pem and client-key.pem") as e:
        Client(server.url, tls_certs=tls_certs.ca_only)
    assert server.url in str(e.value)


def test_plain_client_tls_server(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, transport="tcp", tls_dir=tls_certs.server)
    plain_url = server.url.replace("nbds://", "nbd://")
    with pytest.raises(_nbd.OptionError, match="requires TLS: use an nbds://") as e:
        Client(plain_url)
    assert e.value.reply_type == _nbd_wire.NBD_REP_ERR_TLS_REQD
    assert plain_url in str(e.value)


def test_tls_client_plain_server(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, transport="tcp")
    tls_url = server.url.replace("nbd://", "nbds://")
    with pytest.raises(_nbd.OptionError, match="refused TLS") as e:
        Client(tls_url, tls_certs=tls_certs.client)
    assert e.value.option == _nbd_wire.NBD_OPT_STARTTLS
    assert tls_url in str(e.value)
    # The server still serves plain clients.
    with Client(server.url) as client:
        assert client.read(0, 4) == bytes(4)


def test_tls_certificate_directory_errors(tmp_path, tls_certs):
    with pytest.raises(_nbd.Error, match=r"has no ca-cert.pem"):
        Client("nbds://127.0.0.1:1/", tls_certs=str(tmp_path))
    half = tmp_path / "half"
    half.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem"):
        with open(os.path.join(tls_certs.client, name), "rb") as f:
            (half / name).write_bytes(f.read())
    with pytest.raises(_nbd.Error, match=r"client-key.pem is missing"):
        Client("nbds://127.0.0.1:1/", tls_certs=str(half))


# nbdkit


def test_nbdkit_memory(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=4M")
    with Client(server.url) as client:
        assert client.export_size == 4 * MiB
        assert all_extents(client) == [(4 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        client.write(64 * KiB, pattern(1, 128 * KiB))
        client.zero(96 * KiB, 32 * KiB)
        client.trim(1 * MiB, 1 * MiB)
        client.flush()
        expected = bytearray(256 * KiB)
        expected[64 * KiB : 192 * KiB] = pattern(1, 128 * KiB)
        expected[96 * KiB : 128 * KiB] = bytes(32 * KiB)
        assert client.read(0, 256 * KiB) == expected
        extents = all_extents(client)
        assert flags_at(extents, 64 * KiB) == 0
        assert flags_at(extents, 1 * MiB) == NBD_STATE_HOLE | NBD_STATE_ZERO


def test_nbdkit_sparse_random(tmp_path, nbd_servers):
    size = 8 * MiB
    server = nbd_servers.nbdkit(
        "sparse-random", f"size={size}", "seed=42", "percent=30", "runlength=262144"
    )
    with Client(server.url) as client:
        data = client.read(0, size)
        extents = all_extents(client)
    holes = [(offset, length) for offset, length in _offsets(extents) if _is_hole(extents, offset)]
    assert holes, "sparse-random should have holes"
    assert 0 < data.count(0) < size
    for offset, length in holes:
        assert data[offset : offset + length] == bytes(length)
    for offset, length in _offsets(extents):
        if not _is_hole(extents, offset):
            assert data[offset : offset + length].count(0) < length

    # qemu's own NBD client reads the same bytes.
    ours = tmp_path / "ours.raw"
    ours.write_bytes(data)
    qemu_img_compare(ours, server.url, "raw", "raw")


def _offsets(extents):
    offset = 0
    for length, _flags in extents:
        yield offset, length
        offset += length


def _is_hole(extents, offset):
    return flags_at(extents, offset) & NBD_STATE_ZERO


def test_nbdkit_data(nbd_servers):
    server = nbd_servers.nbdkit(
        "data", "data=0x01 0x02 0x03 @0x1000 ( 0x55 0xaa )*256 @^4096", options=["-r"]
    )
    with Client(server.url) as client:
        assert client.export_size == 8 * KiB
        assert client.is_read_only
        expected = b"\x01\x02\x03" + bytes(4 * KiB - 3) + b"\x55\xaa" * 256 + bytes(3584)
        assert client.read(0, 8 * KiB) == expected
        with pytest.raises(_nbd.RequestError, match="read-only") as e:
            client.write(0, b"x")
        assert e.value.errno == _nbd_wire.NBD_EPERM
        with pytest.raises(_nbd.RequestError, match="read-only"):
            client.zero(0, 4 * KiB)
        assert client.read(0, 3) == b"\x01\x02\x03"


def test_nbdkit_error_filter(tmp_path, nbd_servers):
    inject = tmp_path / "inject"
    inject.touch()
    server = nbd_servers.nbdkit(
        "memory",
        "size=1M",
        "error-pread-rate=1",
        f"error-pread-file={inject}",
        filters=["error"],
    )
    with Client(server.url) as client:
        client.write(0, pattern(1, 64 * KiB))
        with pytest.raises(_nbd.RequestError) as e:
            client.read(0, 64 * KiB)
        assert e.value.errno == _nbd_wire.NBD_EIO
        assert (e.value.offset, e.value.length) == (0, 64 * KiB)
        assert "EIO (input/output error)" in str(e.value)
        assert server.url in str(e.value)

        # Pipelined reads all fail; the write among them still completes.
        reads = [client.submit_read(i * 4 * KiB, bytearray(4 * KiB)) for i in range(8)]
        write = client.submit_write(128 * KiB, pattern(2, 4 * KiB))
        client.wait(write)
        for i, handle in enumerate(reads):
            with pytest.raises(_nbd.RequestError) as e:
                client.wait(handle)
            assert (e.value.errno, e.value.offset) == (_nbd_wire.NBD_EIO, i * 4 * KiB)
        for i in range(4):
            client.submit_read(i * 4 * KiB, bytearray(4 * KiB))
        with pytest.raises(_nbd.RequestError, match="EIO"):
            client.wait_all()

        # The connection is still usable.
        client.flush()
        assert client.extents(0, 1 * MiB)[BASE_ALLOCATION][0][1] == 0
        inject.unlink()
        assert client.read(0, 64 * KiB) == pattern(1, 64 * KiB)
        assert client.read(128 * KiB, 4 * KiB) == pattern(2, 4 * KiB)


def test_nbdkit_error_filter_simple_replies(nbd_servers):
    server = nbd_servers.nbdkit(
        "memory",
        "size=1M",
        "error=ENOSPC",
        "error-pwrite-rate=1",
        filters=["error"],
        options=["--no-sr"],
    )
    with Client(server.url) as client:
        assert not client.structured_replies
        with pytest.raises(_nbd.RequestError, match="ENOSPC") as e:
            client.write(0, pattern(1, 4 * KiB))
        assert e.value.errno == _nbd_wire.NBD_ENOSPC
        client.zero(0, 8 * KiB)
        assert client.read(0, 8 * KiB) == bytes(8 * KiB)


def test_server_shutting_down(nbd_servers):
    server = nbd_servers.nbdkit(
        "memory", "size=1M", "error=ESHUTDOWN", "error-pread-rate=1", filters=["error"]
    )
    client = Client(server.url)
    try:
        with pytest.raises(_nbd.RequestError, match="ESHUTDOWN") as e:
            client.read(0, 4 * KiB)
        assert e.value.errno == _nbd_wire.NBD_ESHUTDOWN
        # The spec asks the client to disconnect: no new requests.
        with pytest.raises(_nbd.ProtocolError, match="shutting down"):
            client.write(0, b"x")
    finally:
        client.close()


def test_nbdkit_delay_pipelining(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=1M", "delay-read=300ms", filters=["delay"])
    with Client(server.url) as client:
        for i in range(16):
            client.write(i * 64 * KiB, pattern(i, 64 * KiB))

        # A slow read first, then a write: the write reply overtakes it.
        buf = bytearray(64 * KiB)
        read = client.submit_read(0, buf)
        start = time.monotonic()
        client.wait(client.submit_write(64 * KiB, pattern(99, 64 * KiB)))
        assert time.monotonic() - start < 0.25
        client.wait(read)
        assert buf == pattern(0, 64 * KiB)

        # Sixteen slow reads in flight at once take about one delay.
        buffers = [bytearray(64 * KiB) for _round in range(16)]
        start = time.monotonic()
        handles = [client.submit_read(i * 64 * KiB, buffers[i]) for i in range(16)]
        for handle in reversed(handles):
            client.wait(handle)
        assert time.monotonic() - start < 16 * 0.3 / 2
    assert buffers[1] == pattern(99, 64 * KiB)
    for i in (0, *range(2, 16)):
        assert buffers[i] == pattern(i, 64 * KiB)


def test_nbdkit_without_structured_replies(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=1M", options=["--no-sr"])
    with Client(server.url) as client:
        assert not client.structured_replies
        assert client.contexts == {}
        client.write(0, pattern(1, 128 * KiB))
        buffers = [bytearray(8 * KiB) for _round in range(16)]
        for i, buf in enumerate(buffers):
            client.submit_read(i * 8 * KiB, buf)
        client.wait_all()
        assert b"".join(buffers) == pattern(1, 128 * KiB)
        with pytest.raises(_nbd.RequestError, match="no metadata context"):
            client.extents(0, 1 * MiB)


def requests_logged(log):
    """The requests nbdkit's log filter saw: [("Write", "fua=0"), ("Flush", ""), ...]."""
    requests = []
    for line in log.read_text().splitlines():
        words = line.split()
        # Replies are logged as "...Write id=1 return=0"; requests without dots.
        if len(words) > 4 and words[2].startswith("connection=") and words[4].startswith("id="):
            if words[3].startswith("..."):
                continue
            requests.append((words[3], " ".join(w for w in words[5:] if w.startswith("fua="))))
    return requests


def test_fua_without_server_support(tmp_path, nbd_servers):
    # The fua filter hides FUA; the client follows the write with a flush.
    log = tmp_path / "requests.log"
    server = nbd_servers.nbdkit("memory", "size=1M", f"logfile={log}", filters=["log", "fua"])
    with Client(server.url) as client:
        assert not client.can_fua and client.can_flush
        client.write(0, pattern(1, 8 * KiB), fua=True)
        assert client.read(0, 8 * KiB) == pattern(1, 8 * KiB)
    assert requests_logged(log)[:3] == [("Write", "fua=0"), ("Flush", ""), ("Read", "")]


def test_zero_without_write_zeroes(tmp_path, nbd_servers):
    log = tmp_path / "requests.log"
    server = nbd_servers.nbdkit(
        "memory", "size=4M", "zeromode=none", f"logfile={log}", filters=["log", "nozero"]
    )
    with Client(server.url) as client:
        assert not client.can_zero and not client.can_fast_zero
        client.write(0, pattern(1, 3 * MiB))
        client.zero(4 * KiB, 3 * MiB - 8 * KiB)
        expected = pattern(1, 4 * KiB) + bytes(3 * MiB - 8 * KiB) + pattern(1, 3 * MiB)[-4 * KiB :]
        assert client.read(0, 3 * MiB) == expected
        with pytest.raises(_nbd.RequestError, match="cannot zero fast") as e:
            client.zero(0, 4 * KiB, fast=True)
        assert e.value.errno == _nbd_wire.NBD_ENOTSUP
    # Zeros went out as 1 MiB writes.
    assert [name for name, _flags in requests_logged(log)] == ["Write"] * 4 + ["Read"]


def test_fast_zero(nbd_servers):
    fast = nbd_servers.nbdkit("memory", "size=1M")
    with Client(fast.url) as client:
        assert client.can_fast_zero
        client.write(0, pattern(1, 64 * KiB))
        client.zero(0, 64 * KiB, fast=True)
        assert client.read(0, 64 * KiB) == bytes(64 * KiB)

    slow = nbd_servers.nbdkit(
        "memory", "size=1M", "zeromode=plugin", "fastzeromode=slow", filters=["nozero"]
    )
    with Client(slow.url) as client:
        assert client.can_fast_zero
        client.write(0, pattern(1, 64 * KiB))
        with pytest.raises(_nbd.RequestError, match="ENOTSUP") as e:
            client.zero(0, 64 * KiB, fast=True)
        assert e.value.errno == _nbd_wire.NBD_ENOTSUP
        assert client.read(0, 64 * KiB) == pattern(1, 64 * KiB)
        client.zero(0, 64 * KiB)
        assert client.read(0, 64 * KiB) == bytes(64 * KiB)


@pytest.mark.parametrize("mask", ["0", "2"])
def test_nbdkit_export_name_fallback(nbd_servers, tls_certs, mask):
    # Without fixed newstyle the client selects the export with
    # NBD_OPT_EXPORT_NAME, with (mask 0) or without (mask 2) zero padding.
    server = nbd_servers.nbdkit("memory", "size=1M", options=[f"--mask-handshake={mask}"])
    with Client(server.url) as client:
        assert client.export_size == 1 * MiB
        assert not client.structured_replies
        client.write(4 * KiB, pattern(5, 4 * KiB))
        assert client.read(4 * KiB, 4 * KiB) == pattern(5, 4 * KiB)
    with pytest.raises(_nbd.ProtocolError, match="cannot start TLS"):
        Client(server.url, tls_certs=tls_certs.client)


def test_nbdkit_oldstyle_is_refused(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=1M", options=["--oldstyle"])
    with pytest.raises(_nbd.ProtocolError, match="oldstyle NBD handshake"):
        Client(server.url)


def test_nbdkit_tls_required(nbd_servers, tls_certs):
    server = nbd_servers.nbdkit(
        "memory",
        "size=1M",
        options=[
            "--tls=require",
            f"--tls-certificates={tls_certs.server}",
            "--tls-verify-peer",
            "--verbose",
        ],
        transport="tcp",
    )
    with Client(server.url, tls_certs=tls_certs.client) as client:
        client.write(0, pattern(3, 4 * KiB))
        assert client.read(0, 4 * KiB) == pattern(3, 4 * KiB)
    with pytest.raises(_nbd.OptionError, match="requires TLS"):
        Client(server.url.replace("nbds://", "nbd://"))
    # The refused client left with NBD_OPT_ABORT and waited for the reply.
    wait_for_log(server, "replying to NBD_OPT_ABORT with NBD_REP_ACK")
    assert "Broken pipe" not in server.stderr()


# Bad input and failures


def test_nothing_listening_tcp():
    port = free_port()
    with pytest.raises(_nbd.ProtocolError) as e:
        Client(f"nbd://127.0.0.1:{port}")
    assert str(e.value) == f"cannot connect to nbd://127.0.0.1:{port}/: Connection refused"


def test_no_such_socket(tmp_path):
    path = tmp_path / "missing.sock"
    with pytest.raises(_nbd.ProtocolError) as e:
        Client(f"nbd:unix:{path}:exportname=x")
    assert str(e.value) == (
        f"cannot connect to nbd+unix:///x?socket={path}: No such file or directory"
    )


def test_unknown_export(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image, export="disk")
    wrong = server.url.replace("///disk", "///nope")
    with pytest.raises(_nbd.OptionError) as e:
        Client(wrong)
    assert str(e.value).startswith(f"export 'nope' not found on {wrong}")
    assert e.value.reply_type == _nbd_wire.NBD_REP_ERR_UNKNOWN
    with Client(server.url, export="disk") as client:
        assert client.export_size == IMAGE_SIZE


class MisbehavingServer:
    """A peer on a unix socket that sends some bytes, then closes or stalls.

    Real servers do not misbehave on demand; this one stands for a server
    that crashes or is not an NBD server at all.
    """

    def __init__(self, path, send, stall=False):
        self.path = str(path)
        self.send = send
        self.stall = stall
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self):
        conn = self.listener.accept()[0]
        with conn:
            conn.sendall(self.send)
            if self.stall:
                self.done.wait(10)
                return
            # Close our side, then read until the client gives up, so it sees
            # end of file rather than a reset.
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass

    def close(self):
        self.done.set()
        self.thread.join()
        self.listener.close()
        os.unlink(self.path)


@pytest.mark.parametrize(
    "send,problem",
    [
        (b"", "the server closed the connection during the handshake"),
        (b"NBDMAGIC", "the server closed the connection during the handshake"),
        (b"NBDMAGICIHAVEOPT\x00\x03", "the server closed the connection during the handshake"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "is not an NBD server"),
    ],
)
def test_server_closes_mid_handshake(tmp_path, send, problem):
    server = MisbehavingServer(tmp_path / "bad.sock", send)
    try:
        with pytest.raises(_nbd.ProtocolError, match=problem) as e:
            Client(f"nbd+unix:///?socket={server.path}")
        assert f"nbd+unix:///?socket={server.path}" in str(e.value)
    finally:
        server.close()


def test_handshake_timeout(tmp_path):
    server = MisbehavingServer(tmp_path / "slow.sock", b"NBDMAGIC", stall=True)
    try:
        start = time.monotonic()
        with pytest.raises(_nbd.ProtocolError, match=r"timed out after 0.3 seconds") as e:
            Client(f"nbd+unix:///?socket={server.path}", connect_timeout=0.3)
        assert time.monotonic() - start < 5
        assert "during the handshake" in str(e.value)
    finally:
        server.close()


def test_request_timeout_kills_connection(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=1M", "delay-read=3", filters=["delay"])
    client = Client(server.url, timeout=0.3)
    try:
        with pytest.raises(_nbd.ProtocolError, match=r"timed out after 0.3 seconds"):
            client.read(0, 4 * KiB)
        with pytest.raises(_nbd.ProtocolError, match=r"connection is dead: .*timed out"):
            client.write(0, b"x")
    finally:
        client.close()
    client.close()


def test_server_dies_during_transmission(tmp_path, nbd_servers):
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image)
    client = Client(server.url)
    try:
        assert client.read(0, 4) == bytes(4)
        server.kill()
        with pytest.raises(_nbd.ProtocolError, match=r"closed the connection|connection lost"):
            client.read(0, 4 * KiB)
        with pytest.raises(_nbd.ProtocolError, match="connection is dead"):
            client.flush()
    finally:
        client.close()


def test_close(nbd_servers):
    server = nbd_servers.nbdkit("memory", "size=1M", options=["--verbose"])
    client = Client(server.url)
    handles = [client.submit_write(i * 4 * KiB, pattern(i, 4 * KiB)) for i in range(8)]
    # close() lets the requests in flight finish, then disconnects cleanly;
    # their results stay available.
    client.close()
    client.close()
    for handle in handles:
        client.wait(handle)
    with pytest.raises(_nbd.ProtocolError, match="the client is closed"):
        client.read(0, 4)
    with pytest.raises(_nbd.ProtocolError, match="the client is closed"):
        client.wait(handles[0])
    with Client(server.url) as again:
        assert again.read(0, 32 * KiB) == b"".join(pattern(i, 4 * KiB) for i in range(8))
    wait_for_log(server, "client sent NBD_CMD_DISC", 2)


def test_bad_arguments(tmp_path, nbd_servers):
    with pytest.raises(ValueError, match="invalid metadata context 'allocation'"):
        Client("nbd+unix:///?socket=/nonexistent", meta_contexts=("allocation",))
    with pytest.raises(ValueError, match="contains a NUL"):
        Client("nbd+unix:///?socket=/nonexistent", export="a\0b")
    image = create_image(tmp_path / "disk.raw", "raw")
    server = nbd_servers.qemu_nbd(image)
    with Client(server.url) as client:
        with pytest.raises(ValueError, match="invalid offset -1"):
            client.read(-1, 4)
        with pytest.raises(ValueError, match="must be writable"):
            client.readinto(0, b"abcd")
        with pytest.raises(_nbd.RequestError, match="past the end") as e:
            client.read(IMAGE_SIZE - 2, 4)
        assert (e.value.offset, e.value.length) == (IMAGE_SIZE - 2, 4)
        with pytest.raises(_nbd.RequestError, match="outside the export"):
            client.extents(IMAGE_SIZE, 1)
        assert client.read(IMAGE_SIZE - 4, 4) == bytes(4)


# Forwarding: read replies spliced into another server's writes.


def forward(src, dst, offset, length, request_size=None):
    handle, sink_handle = src.submit_forward(offset, length, dst, request_size)
    src.wait(handle)
    dst.wait(sink_handle)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_forward_data_and_holes(tmp_path, nbd_servers, transport):
    """qemu-nbd answers reads of a sparse qcow2 with data and hole chunks:
    the data lands as written, the holes as zeros over what was there."""
    image = create_image(tmp_path / "src.qcow2", "qcow2")
    qemu_io(image, "qcow2", "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 3M 1M")
    source = nbd_servers.qemu_nbd(image, "qcow2", "--read-only", transport=transport)
    target = nbd_servers.nbdkit("memory", f"size={IMAGE_SIZE}", transport=transport)
    with Client(source.url) as src, Client(target.url) as dst:
        assert src.can_forward_to(dst)
        dst.write(0, b"\xff" * IMAGE_SIZE)
        # Unaligned to the requests: pieces of 384 KiB.
        forward(src, dst, 0, IMAGE_SIZE - 64 * KiB, request_size=384 * KiB)
        assert dst.read(0, IMAGE_SIZE) == (src.read(0, IMAGE_SIZE - 64 * KiB) + b"\xff" * 64 * KiB)
        assert dst.read(3 * MiB, 4 * KiB) == b"\x33" * 4 * KiB
        # Both connections still carry ordinary requests.
        assert src.read(1 * MiB, 4 * KiB) == b"\x22" * 4 * KiB


def test_forward_simple_replies_and_zeros_as_writes(tmp_path, nbd_servers):
    """A source without structured replies sends each read as one simple
    reply; a sink without WRITE_ZEROES takes holes as written zeros."""
    image = create_image(tmp_path / "src.qcow2", "qcow2")
    qemu_io(image, "qcow2", "write -P 0x44 512k 512k")
    plain = nbd_servers.nbdkit("memory", "size=2M", options=["--no-sr"])
    log = tmp_path / "requests.log"
    sparse = nbd_servers.qemu_nbd(image, "qcow2", "--read-only")
    target = nbd_servers.nbdkit(
        "memory", "size=4M", "zeromode=none", f"logfile={log}", filters=["log", "nozero"]
    )
    with Client(plain.url) as src, Client(target.url) as dst, Client(sparse.url) as holes:
        assert not src.structured_replies
        src.write(0, pattern(5, 2 * MiB))
        forward(src, dst, 0, 2 * MiB)
        assert dst.read(0, 2 * MiB) == pattern(5, 2 * MiB)
        dst.write(2 * MiB, b"\xff" * 2 * MiB)
        forward(holes, dst, 2 * MiB, 2 * MiB)
        assert dst.read(2 * MiB, 2 * MiB) == holes.read(2 * MiB, 2 * MiB)
    assert "Zero" not in log.read_text()


def test_forward_source_dies(tmp_path, nbd_servers):
    """The source server killed while its replies are forwarded: the copy
    fails with a message naming it, the source connection is dead, nothing
    hangs."""
    source = nbd_servers.nbdkit("pattern", "size=64M", "delay-read=200ms", filters=["delay"])
    target = nbd_servers.nbdkit("memory", "size=64M")
    with Client(source.url) as src, Client(target.url) as dst:
        killer = threading.Timer(0.3, source.kill)
        killer.start()
        try:
            # Sending 64 requests already forwards the replies of the first 48.
            with pytest.raises(_nbd.ProtocolError, match="closed the connection"):
                forward(src, dst, 0, 64 * MiB, 1 * MiB)
        finally:
            killer.join()
        with pytest.raises(_nbd.ProtocolError, match="connection is dead"):
            src.read(0, 4 * KiB)


def test_splice_stops_at_a_short_payload_or_a_silent_peer():
    """Data cut short, or not coming at all, ends the move with an error
    instead of a hang."""
    pipe = os.pipe()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        for sock in (b, c):
            sock.settimeout(5)
        data = pattern(3, 64 * KiB)
        a.sendall(data + b"y" * 1000)
        _nbd._splice(b, c, pipe, len(data), 5)
        d.settimeout(5)
        received = bytearray()
        while len(received) < len(data):
            received += d.recv(len(data))
        assert received == data
        a.close()
        with pytest.raises(ConnectionResetError, match="closed"):
            _nbd._splice(b, c, pipe, 2000, 5)
        e, f = socket.socketpair()
        with e, f:
            f.settimeout(0.2)
            with pytest.raises(socket.timeout, match=r"timed out after 0\.2 seconds"):
                _nbd._splice(f, c, pipe, 10, 0.2)
    finally:
        for fd in pipe:
            os.close(fd)
        for sock in (a, b, c, d):
            sock.close()


def test_forward_to_a_closed_sink(nbd_servers):
    """Replies still in flight when the sink is gone: the source fails as a
    broken connection, and closing it raises nothing."""
    source = nbd_servers.nbdkit("pattern", "size=4M")
    target = nbd_servers.nbdkit("memory", "size=4M")
    src = Client(source.url)
    dst = Client(target.url)
    handle, _sink_handle = src.submit_forward(0, 4 * MiB, dst, 1 * MiB)
    dst.close()
    with pytest.raises(_nbd.ProtocolError, match="cannot forward the data of a read"):
        src.wait(handle)
    with pytest.raises(_nbd.ProtocolError, match="connection is dead"):
        src.read(0, 4 * KiB)
    src.close()
    # Closed with the replies still in flight (servers of their own: the
    # first ones may still be busy with the connections just dropped).
    source = nbd_servers.nbdkit("pattern", "size=4M")
    target = nbd_servers.nbdkit("memory", "size=4M")
    src = Client(source.url)
    dst = Client(target.url)
    src.submit_forward(0, 4 * MiB, dst, 1 * MiB)
    dst.close()
    src.close()


def test_forward_needs_plain_connections(tmp_path, nbd_servers, tls_certs):
    image = create_image(tmp_path / "disk.raw", "raw")
    secure = nbd_servers.qemu_nbd(image, "raw", tls_dir=tls_certs.server)
    plain = nbd_servers.nbdkit("memory", f"size={IMAGE_SIZE}")
    with Client(secure.url, tls_certs=tls_certs.client) as src, Client(plain.url) as dst:
        assert not src.can_forward_to(dst)
        assert not dst.can_forward_to(src)
        assert not dst.can_forward_to(dst)
        with pytest.raises(ValueError, match="cannot forward"):
            src.submit_forward(0, IMAGE_SIZE, dst)
