# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""_qemu_img and _qemu_nbd against the real qemu-img and qemu-nbd."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _nbd,
    _nbd_url,
    _qemu_img,
    _qemu_nbd,
)
from lab.pki import Pki

KiB = 1024
MiB = 1024**2
SIZE = 4 * MiB

# Data regions of the source image; everything else reads as zeros. Some are
# not aligned to clusters, so partial clusters are covered too.
DATA = [
    (0, 64 * KiB),
    (1 * MiB, 300 * KiB),
    (2 * MiB + 4 * KiB, 4 * KiB),
    (SIZE - 64 * KiB, 64 * KiB),
]

# name -> (qemu-img convert arguments, format qemu reports)
FORMATS = {
    "raw": (["-O", "raw"], "raw"),
    "qcow2": (["-O", "qcow2"], "qcow2"),
    "qcow2-compressed": (["-c", "-O", "qcow2"], "qcow2"),
    "vmdk": (["-O", "vmdk"], "vmdk"),
    "vhdx": (["-O", "vhdx"], "vhdx"),
    "vdi": (["-O", "vdi"], "vdi"),
    "qed": (["-O", "qed"], "qed"),
}
IMAGES = [*FORMATS, "iso"]


def expected_format(name):
    return "raw" if name == "iso" else FORMATS[name][1]


# Fixtures and helpers.


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The source raw image, the same data in every format, and an ISO."""
    d = tmp_path_factory.mktemp("images")
    rng = random.Random(42)
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA:
            f.seek(offset)
            f.write(rng.randbytes(length))
    paths = {}
    for name, (args, _format) in FORMATS.items():
        path = d / f"disk-{name}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", *args, src, path], check=True)
        paths[name] = str(path)
    iso = d / "disc.iso"
    shutil.copyfile(src, iso)
    with open(iso, "r+b") as f:
        f.seek(_qemu_img.ISO_DESCRIPTOR_OFFSET)
        f.write(b"\x01CD001\x01\x00")
    paths["iso"] = str(iso)
    paths["src"] = str(src)
    return paths


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Give serve() a temp directory of its own; after the test it must be empty."""
    d = tmp_path / "serve-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    assert_clean(d)


def assert_clean(tmp):
    assert qemu_nbd_children() == []
    assert os.listdir(tmp) == []


def qemu_nbd_children():
    """Live qemu-nbd processes whose parent is this test process."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat_line = f.read()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        state, ppid = stat_line.rsplit(")", 1)[1].split()[:2]
        if comm == "qemu-nbd" and state not in "ZX" and int(ppid) == os.getpid():
            found.append(int(name))
    return found


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def wait_dead(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.02)


def compare(a, b, fmt_a="raw", fmt_b="raw", objects=()):
    """qemu-img compare; return (exit status, output)."""
    proc = subprocess.run(
        ["qemu-img", "compare", *objects, "-f", fmt_a, "-F", fmt_b, a, b],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_identical(a, b, fmt_a="raw", fmt_b="raw", objects=()):
    status, out = compare(a, b, fmt_a, fmt_b, objects)
    assert status == 0, out
    assert "Images are identical" in out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_objects(directory):
    return [f"--object=tls-creds-x509,id=tls0,dir={directory},endpoint=client"]


def tls_url_image(url):
    """A json: filename reading a TLS NBD URL with qemu's own client (object tls0)."""
    address = _nbd_url.parse_url(url)
    if address.transport == "unix":
        server = {"type": "unix", "path": address.path}
    else:
        server = {"type": "inet", "host": address.host, "port": str(address.port)}
    node = {"driver": "nbd", "server": server, "export": address.export, "tls-creds": "tls0"}
    return "json:" + json.dumps({"driver": "raw", "file": node})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """qemu TLS directories: server, client, and a client that only has the CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = Pki(str(d / "ca"))
    dirs = {
        "server": ca.qemu_dir("server", str(d / "server")),
        "client": ca.qemu_dir("client", str(d / "client")),
    }
    ca_only = d / "ca-only"
    ca_only.mkdir()
    shutil.copyfile(os.path.join(dirs["client"], "ca-cert.pem"), ca_only / "ca-cert.pem")
    dirs["ca-only"] = str(ca_only)
    return dirs


@pytest.fixture
def exports():
    """Stop every long-lived export a test started, even when it failed."""
    started = []
    yield started
    for export in started:
        _qemu_nbd.stop(export.pid)


# info, check


@pytest.mark.parametrize("name", IMAGES)
def test_info(images, name):
    result = _qemu_img.info(images[name])
    assert result["format"] == expected_format(name)
    assert result["virtual-size"] == SIZE
    assert result["filename"] == images[name]


def test_info_compressed_qcow2_has_compressed_clusters(images):
    assert _qemu_img.check(images["qcow2-compressed"])["compressed-clusters"] > 0


def test_info_given_format(images):
    assert _qemu_img.info(images["qcow2"], fmt="raw")["format"] == "raw"
    with pytest.raises(_qemu_img.QemuError) as e:
        _qemu_img.info(images["src"], fmt="qcow2")
    assert str(e.value).startswith(f"cannot read image '{images['src']}': qemu-img: ")
    assert "Image is not in qcow2 format" in str(e.value)


def test_info_backing_chain(tmp_path, images):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img.create(str(base), "qcow2", SIZE)
    _qemu_img.create(str(top), "qcow2", None, backing="base.qcow2")
    result = _qemu_img.info(str(top), backing_chain=True)
    assert result["format"] == "qcow2"
    assert result["backing-filename"] == "base.qcow2"
    assert [i["filename"] for i in result["chain"]] == [str(top), str(base)]


@pytest.mark.parametrize("name", IMAGES)
def test_check(images, name):
    result = _qemu_img.check(images[name])
    if expected_format(name) == "raw":
        assert result == {"filename": images[name], "format": None, "checked": False}
    else:
        assert result["checked"] is True
        assert result.get("corruptions", 0) == 0
        assert result["check-errors"] == 0


def test_check_reports_leaks_without_failing(tmp_path, images):
    # Leak one cluster by hand: append a cluster and give it a refcount of
    # 1 that nothing references (qcow2 header: cluster_bits at byte 20,
    # refcount table offset at 48; 16-bit refcounts by default).
    path = tmp_path / "leaky.qcow2"
    shutil.copyfile(images["qcow2"], path)
    with open(path, "r+b") as f:
        header = f.read(56)
        (cluster_bits,) = struct.unpack(">I", header[20:24])
        (table_offset,) = struct.unpack(">Q", header[48:56])
        cluster_size = 1 << cluster_bits
        f.seek(table_offset)
        (block_offset,) = struct.unpack(">Q", f.read(8))
        leaked = -(-os.fstat(f.fileno()).st_size // cluster_size)
        f.truncate((leaked + 1) * cluster_size)
        f.seek(block_offset + 2 * leaked)
        f.write(struct.pack(">H", 1))
    result = _qemu_img.check(str(path))
    assert result["checked"] is True
    assert result["leaks"] == 1
    assert result.get("corruptions", 0) == 0


# NBD URLs as images


def test_info_check_nbd_url(images):
    with _qemu_nbd.serve(images["qcow2"]) as export:
        assert _qemu_img.info(export.url)["format"] == "raw"
        assert _qemu_img.info(export.url)["virtual-size"] == SIZE
        assert _qemu_img.check(export.url)["checked"] is False


def test_info_legacy_nbd_url(images):
    with _qemu_nbd.serve(images["src"]) as export:
        result = _qemu_img.info(f"nbd:unix:{export.socket}")
        assert result["virtual-size"] == SIZE


# serve


@pytest.mark.parametrize("name", IMAGES)
def test_serve(images, private_tmp, name):
    with _qemu_nbd.serve(images[name]) as export:
        assert export.format == expected_format(name)
        assert export.url == f"nbd+unix:///?socket={export.socket}"
        assert export.export_name == ""
        assert export.readonly
        directory = os.path.dirname(export.socket)
        assert os.path.dirname(directory) == str(private_tmp)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert process_alive(export.pid)
        # The format is never left for qemu-nbd to probe.
        assert f"--format={export.format}" in export.argv
        assert_identical(images["iso" if name == "iso" else "src"], export.url)
    assert not process_alive(export.pid)
    assert not os.path.exists(directory)


def test_serve_nbd_url(images):
    with _qemu_nbd.serve(images["vmdk"]) as inner, _qemu_nbd.serve(inner.url) as outer:
        assert outer.format == "raw"
        assert "--cache=writeback" in outer.argv
        assert_identical(images["src"], outer.url)


def test_serve_export_name(images):
    with _qemu_nbd.serve(images["qcow2"], export_name="disk 1/é") as export:
        assert _nbd_url.parse_url(export.url).export == "disk 1/é"
        assert_identical(images["src"], export.url)


def test_serve_writable(tmp_path, images):
    image = tmp_path / "disk.qcow2"
    expected = tmp_path / "expected.raw"
    shutil.copyfile(images["qcow2"], image)
    shutil.copyfile(images["src"], expected)
    write = "write -P 0xab 1536k 128k"
    with _qemu_nbd.serve(str(image), readonly=False) as export:
        assert not export.readonly
        subprocess.run(["qemu-io", "-f", "raw", "-c", write, export.url], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", write, expected], check=True)
    assert_identical(str(expected), str(image), fmt_b="qcow2")


def test_serve_readonly_refuses_writes(tmp_path, images):
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(images["qcow2"], image)
    with _qemu_nbd.serve(str(image)) as export:
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", export.url],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 1
        assert "Permission denied" in proc.stderr
    assert_identical(images["src"], str(image), fmt_b="qcow2")


def test_serve_allocation_depth(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img.create(str(base), "qcow2", SIZE)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", base], check=True)
    _qemu_img.create(str(top), "qcow2", None, backing=str(base))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 2M 1M", top], check=True)
    depth = "qemu:allocation-depth"

    with _qemu_nbd.serve(str(top)) as export:
        assert "--allocation-depth" in export.argv
        with _nbd.Client(export.url, meta_contexts=(depth,)) as client:
            extents = client.extents(0, SIZE)[depth]
    # Depth 2: from the backing file, 1: this image, 0: nowhere in the chain.
    assert extents == [(MiB, 2), (MiB, 0), (MiB, 1), (MiB, 0)]

    with (
        _qemu_nbd.serve(str(top), allocation_depth=False) as export,
        _nbd.Client(export.url, meta_contexts=(depth,)) as client,
    ):
        assert depth not in client.contexts


def test_serve_raw_has_no_allocation_depth(images):
    with _qemu_nbd.serve(images["src"]) as export:
        assert "--allocation-depth" not in export.argv


def test_serve_cache_modes(images, tmp_path):
    # A read-only export reads through the page cache, as qemu-img convert
    # reads its source.
    with _qemu_nbd.serve(images["qcow2"]) as export:
        assert "--cache=writeback" in export.argv
        assert "--aio=threads" in export.argv
        assert_identical(images["src"], export.url)
    # A writable export on a disk file system (where O_DIRECT works) writes
    # straight to storage, as vdsm runs qemu-nbd.
    target = tmp_path / "target.qcow2"
    _qemu_img.create(str(target), "qcow2", 1024**2)
    with _qemu_nbd.serve(str(target), readonly=False) as export:
        assert "--cache=none" in export.argv
        assert "--aio=native" in export.argv


def test_serve_keeps_request_buffers(images, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    tunables = _qemu_nbd._qemu_nbd_environment()["GLIBC_TUNABLES"].split(":")
    # The user's own tunables come last and win.
    assert tunables == [*_qemu_nbd.QEMU_NBD_MALLOC_TUNABLES, "glibc.malloc.arena_max=2"]
    with _qemu_nbd.serve(images["qcow2"]) as export, open(f"/proc/{export.pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    # glibc cuts the variable at the first tunable while it parses it.
    first = _qemu_nbd.QEMU_NBD_MALLOC_TUNABLES[0].encode()
    assert any(v.startswith(b"GLIBC_TUNABLES=" + first) for v in environ)


def test_serve_accepts_every_worker_and_the_map_reader(images):
    # A copy with 8 workers opens 9 connections; one more than the export
    # allows would wait forever in the handshake.
    with _qemu_nbd.serve(images["qcow2"]) as export:
        clients = [_nbd.Client(export.url) for _i in range(_qemu_nbd.SERVE_CONNECTIONS)]
        try:
            assert all(c.export_size == clients[0].export_size for c in clients)
        finally:
            for c in clients:
                c.close()


def test_serve_stops_on_exception(images, private_tmp):
    with pytest.raises(RuntimeError), _qemu_nbd.serve(images["qcow2"]) as export:
        pid = export.pid
        raise RuntimeError("boom")
    assert not process_alive(pid)
    assert_clean(private_tmp)


def test_serve_stops_on_keyboard_interrupt(images, private_tmp):
    with pytest.raises(KeyboardInterrupt), _qemu_nbd.serve(images["qcow2"]) as export:
        pid = export.pid
        raise KeyboardInterrupt
    assert not process_alive(pid)
    assert_clean(private_tmp)


def test_serve_dies_with_its_owner(tmp_path, images):
    # The owner is killed without a chance to clean up; the kernel's
    # parent-death signal still stops qemu-nbd.
    script = (
        "import sys, time\n"
        "from ansible_collections.thinair.ovirt.plugins.module_utils import _qemu_nbd\n"
        "with _qemu_nbd.serve(sys.argv[1]) as e:\n"
        "    print(e.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    owner = subprocess.Popen(
        [sys.executable, "-c", script, images["qcow2"]], stdout=subprocess.PIPE, env=env
    )
    try:
        pid = int(owner.stdout.readline())
        assert process_alive(pid)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    wait_dead(pid)


# create, is_iso, version


def test_create_qcow2(tmp_path):
    path = tmp_path / "new.qcow2"
    _qemu_img.create(str(path), "qcow2", 3 * MiB, compat="0.10")
    result = _qemu_img.info(str(path))
    assert result["format"] == "qcow2"
    assert result["virtual-size"] == 3 * MiB
    assert result["format-specific"]["data"]["compat"] == "0.10"


def test_create_raw_preallocated(tmp_path):
    path = tmp_path / "new.raw"
    _qemu_img.create(str(path), "raw", 2 * MiB, preallocation="full")
    assert os.stat(path).st_blocks * 512 >= 2 * MiB
    assert _qemu_img.info(str(path))["virtual-size"] == 2 * MiB


def test_create_with_nbd_backing(tmp_path, images):
    top = tmp_path / "top.qcow2"
    with _qemu_nbd.serve(images["qcow2"]) as export:
        _qemu_img.create(str(top), "qcow2", None, backing=export.url)
        result = _qemu_img.info(str(top))
        assert result["backing-filename"] == export.url
        assert result["backing-filename-format"] == "raw"
        assert_identical(images["src"], str(top), fmt_b="qcow2")


def test_create_bad_input_leaves_no_file(tmp_path):
    path = tmp_path / "new.img"
    with pytest.raises(_qemu_img.QemuError, match="Unknown file format 'nosuch'"):
        _qemu_img.create(str(path), "nosuch", MiB)
    assert not path.exists()
    with pytest.raises(_qemu_img.QemuError, match="give a size or a backing file"):
        _qemu_img.create(str(path), "qcow2", None)
    assert not path.exists()
    with pytest.raises(_qemu_img.QemuError, match="no such file"):
        _qemu_img.create(str(path), "qcow2", None, backing="missing.qcow2")
    assert not path.exists()


def test_create_replaces_existing_file(tmp_path):
    path = tmp_path / "existing.qcow2"
    path.write_bytes(b"old data")
    _qemu_img.create(str(path), "qcow2", MiB)
    assert _qemu_img.info(str(path))["format"] == "qcow2"
    # A failed creation leaves nothing at the path, as qemu-img does.
    with pytest.raises(_qemu_img.QemuError, match="'preallocation' does not accept value 'bogus'"):
        _qemu_img.create(str(path), "qcow2", MiB, preallocation="bogus")
    assert not path.exists()


def test_is_iso(tmp_path, images):
    assert _qemu_img.is_iso(images["iso"])
    assert not _qemu_img.is_iso(images["src"])
    assert not _qemu_img.is_iso(images["qcow2"])
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 100)
    assert not _qemu_img.is_iso(str(short))
    with pytest.raises(_qemu_img.QemuError, match="no such file"):
        _qemu_img.is_iso(str(tmp_path / "missing.iso"))


def test_version():
    # qemu-nbd comes from the same build as qemu-img.
    out = subprocess.run(
        ["qemu-nbd", "--version"], capture_output=True, text=True, check=True
    ).stdout
    expected = tuple(int(n) for n in out.split()[1].split("."))
    assert _qemu_img.version() == expected


# Bad input: a clear error naming the image, and nothing left behind.


@pytest.mark.parametrize("call", ["info", "check", "serve", "is_iso"])
def test_missing_file(tmp_path, private_tmp, call):
    path = str(tmp_path / "missing.qcow2")
    with pytest.raises(_qemu_img.QemuError) as e:
        run(call, path)
    assert str(e.value) == f"cannot read image '{path}': no such file"
    assert_clean(private_tmp)


@pytest.mark.parametrize("call", ["info", "check", "serve", "is_iso"])
def test_directory(tmp_path, private_tmp, call):
    with pytest.raises(_qemu_img.QemuError) as e:
        run(call, str(tmp_path))
    assert str(e.value) == f"cannot read image '{tmp_path}': it is a directory"
    assert_clean(private_tmp)


def run(call, image):
    if call == "serve":
        with _qemu_nbd.serve(image):
            pytest.fail("serve() must fail")
    return getattr(_qemu_img, call)(image)


def test_text_file_is_a_raw_image(tmp_path):
    # qemu reads any file without a known header as raw and rounds its size
    # up to whole 512-byte sectors; serving it exposes exactly those bytes.
    text = b"this is not a disk image\n" * 40
    path = tmp_path / "notes.txt"
    path.write_bytes(text)
    result = _qemu_img.info(str(path))
    assert result["format"] == "raw"
    assert result["virtual-size"] == 1024
    assert not _qemu_img.is_iso(str(path))
    with _qemu_nbd.serve(str(path)) as export, _nbd.Client(export.url) as client:
        assert client.read(0, 1024) == text + b"\0" * (1024 - len(text))


@pytest.fixture
def truncated_qcow2(tmp_path, images):
    path = tmp_path / "truncated.qcow2"
    with open(images["qcow2"], "rb") as f:
        path.write_bytes(f.read(300 * KiB))
    return str(path)


def test_truncated_qcow2_check(truncated_qcow2):
    with pytest.raises(_qemu_img.QemuError) as e:
        _qemu_img.check(truncated_qcow2)
    assert str(e.value).startswith(f"image '{truncated_qcow2}' is corrupt: qemu-img check found")
    assert "exceeding the end of the file" in str(e.value)


def test_truncated_qcow2_serve(truncated_qcow2, private_tmp):
    # qemu-nbd alone would serve zeros where the data was cut off.
    with pytest.raises(_qemu_img.QemuError, match="is corrupt"), _qemu_nbd.serve(truncated_qcow2):
        pytest.fail("serve() must refuse a truncated image")
    assert_clean(private_tmp)


def test_truncated_header(tmp_path, private_tmp, images):
    path = tmp_path / "header.qcow2"
    with open(images["qcow2"], "rb") as f:
        path.write_bytes(f.read(50))
    with pytest.raises(_qemu_img.QemuError, match="qcow2 header too short"):
        _qemu_img.info(str(path))
    with (
        pytest.raises(_qemu_img.QemuError, match="qcow2 header too short"),
        _qemu_nbd.serve(str(path)),
    ):
        pass
    assert_clean(private_tmp)


def test_serve_wrong_format(images, private_tmp):
    with pytest.raises(_qemu_img.QemuError) as e, _qemu_nbd.serve(images["src"], fmt="qcow2"):
        pass
    assert "Image is not in qcow2 format" in str(e.value)
    assert_clean(private_tmp)


def test_serve_qemu_nbd_fails_to_start(images, private_tmp):
    # Probing and checking pass; qemu-nbd itself refuses the missing bitmap.
    with pytest.raises(_qemu_img.QemuError) as e, _qemu_nbd.serve(images["qcow2"], bitmap="nosuch"):
        pass
    message = str(e.value)
    assert message.startswith(f"cannot serve image '{images['qcow2']}': qemu-nbd: ")
    assert "nosuch" in message
    assert_clean(private_tmp)


@pytest.mark.parametrize(
    "url",
    ["nbd://127.0.0.1:notaport/", "nbd+unix:///?sock=/x", "nbd://[::1/"],
)
def test_malformed_nbd_url(private_tmp, url):
    with pytest.raises(_qemu_img.QemuError) as e:
        _qemu_img.info(url)
    assert str(e.value).startswith(f"cannot read image '{url}': qemu-img: Could not open")
    # Told the format, serve() skips the probe: qemu-nbd reports the error.
    with pytest.raises(_qemu_img.QemuError) as e, _qemu_nbd.serve(url, fmt="raw"):
        pass
    assert str(e.value).startswith(f"cannot serve image '{url}': qemu-nbd: ")
    assert_clean(private_tmp)


def test_nbd_url_nothing_listening(tmp_path, private_tmp):
    port = free_port()
    url = f"nbd://127.0.0.1:{port}/"
    with pytest.raises(_qemu_img.QemuError, match="Connection refused"):
        _qemu_img.info(url)
    with pytest.raises(_qemu_img.QemuError, match="Connection refused"), _qemu_nbd.serve(url):
        pass
    url = f"nbd+unix:///?socket={tmp_path}/nobody.sock"
    with pytest.raises(_qemu_img.QemuError, match="No such file or directory"):
        _qemu_img.info(url)
    with (
        pytest.raises(_qemu_img.QemuError, match="No such file or directory"),
        _qemu_nbd.serve(url, "raw"),
    ):
        pass
    assert_clean(private_tmp)


def test_nbds_url_needs_certificates(private_tmp):
    with pytest.raises(_qemu_img.QemuError, match="an nbds URL needs tls_certs"):
        _qemu_img.info("nbds://127.0.0.1:10809/")
    assert_clean(private_tmp)


def test_missing_qemu_img(monkeypatch, images):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(_qemu_img.QemuError, match="qemu-img not found: install qemu-utils"):
        _qemu_img.info(images["src"])


# Long-lived exports: export_command, start, find_exports, stop


def test_start_unix_export(tmp_path, images, exports):
    sock = str(tmp_path / "disk.sock")
    argv = _qemu_nbd.export_command(images["qcow2"], socket=sock, export_name="disk1")
    assert argv == _qemu_nbd.export_command(images["qcow2"], socket=sock, export_name="disk1")
    planned = _qemu_nbd.Export(argv)
    assert planned.pid is None
    assert planned.url == f"nbd+unix:///disk1?socket={sock}"

    export = _qemu_nbd.start(argv)
    exports.append(export)
    assert export.argv == argv
    assert export.url == planned.url
    assert (export.format, export.readonly, export.export_name) == ("qcow2", True, "disk1")
    assert export.image == images["qcow2"]
    assert_identical(images["src"], export.url)

    found = _qemu_nbd.find_export(("unix", sock))
    assert (found.pid, found.argv) == (export.pid, argv)
    assert export.pid in [e.pid for e in _qemu_nbd.find_exports()]

    # The endpoint is taken: starting again is refused, the export lives on.
    with pytest.raises(_qemu_img.QemuError, match=f"in use by qemu-nbd pid {export.pid}"):
        _qemu_nbd.start(argv)
    assert process_alive(export.pid)

    assert _qemu_nbd.stop(export.pid) is True
    assert not process_alive(export.pid)
    assert not os.path.exists(sock)
    assert _qemu_nbd.find_export(("unix", sock)) is None
    assert _qemu_nbd.stop(export.pid) is False


def test_start_tcp_export_writable(tmp_path, images, exports):
    image = tmp_path / "disk.vdi"
    shutil.copyfile(images["vdi"], image)
    port = free_port()
    argv = _qemu_nbd.export_command(str(image), readonly=False, port=port)
    export = _qemu_nbd.start(argv)
    exports.append(export)
    assert export.url == f"nbd://127.0.0.1:{port}/"
    assert export.endpoint == ("tcp", "127.0.0.1", port)
    assert "--discard=unmap" in argv
    assert "--detect-zeroes=unmap" in argv
    # The format probe must not trip over the lock of the running export.
    assert _qemu_nbd.export_command(str(image), readonly=False, port=port) == argv
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -z 0 64k", export.url], check=True)
    _qemu_nbd.stop(export.pid)
    expected = tmp_path / "expected.raw"
    shutil.copyfile(images["src"], expected)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -z 0 64k", expected], check=True)
    assert_identical(str(expected), str(image), fmt_b="vdi")


def test_start_tls_export(images, pki, exports, private_tmp):
    port = free_port()
    argv = _qemu_nbd.export_command(images["qcow2"], port=port, tls_certs=pki["server"])
    export = _qemu_nbd.start(argv)
    exports.append(export)
    assert export.url == f"nbds://127.0.0.1:{port}/"
    assert export.tls
    assert export.tls_certs == pki["server"]

    assert_identical(images["src"], tls_url_image(export.url), objects=tls_objects(pki["client"]))
    assert _qemu_img.info(export.url, tls_certs=pki["client"])["virtual-size"] == SIZE
    with _qemu_nbd.serve(export.url, tls_certs=pki["client"]) as local:
        assert_identical(images["src"], local.url)

    # Without TLS, and without a client certificate, the server says no.
    plain = export.url.replace("nbds://", "nbd://")
    with pytest.raises(_qemu_img.QemuError, match="TLS negotiation required"):
        _qemu_img.info(plain)
    with pytest.raises(_qemu_img.QemuError, match="the server may require a client certificate"):
        _qemu_img.info(export.url, tls_certs=pki["ca-only"])
    assert_clean(private_tmp)


def test_start_tls_unix_export(tmp_path, images, pki, exports):
    sock = str(tmp_path / "tls.sock")
    export = _qemu_nbd.start(
        _qemu_nbd.export_command(images["src"], socket=sock, tls_certs=pki["server"])
    )
    exports.append(export)
    assert export.url == f"nbds+unix:///?socket={sock}"
    assert _qemu_img.info(export.url, tls_certs=pki["client"])["virtual-size"] == SIZE


def test_start_failure_leaves_nothing(tmp_path, images):
    sock = tmp_path / "disk.sock"
    argv = _qemu_nbd.export_command(images["qcow2"], socket=str(sock), bitmap="nosuch")
    with pytest.raises(_qemu_img.QemuError) as e:
        _qemu_nbd.start(argv)
    assert str(e.value).startswith(f"cannot export image '{images['qcow2']}': qemu-nbd: ")
    assert _qemu_nbd.find_export(("unix", str(sock))) is None
    assert not sock.exists()


def test_start_wrong_format(tmp_path, images):
    # The command line is only a plan; starting it checks the image.
    sock = tmp_path / "disk.sock"
    argv = _qemu_nbd.export_command(images["src"], fmt="qcow2", socket=str(sock))
    with pytest.raises(_qemu_img.QemuError, match="Image is not in qcow2 format"):
        _qemu_nbd.start(argv)
    assert not sock.exists()


def test_start_refuses_to_replace_a_file(tmp_path, images):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    argv = _qemu_nbd.export_command(images["src"], socket=str(path))
    with pytest.raises(_qemu_img.QemuError, match="exists and is not a socket"):
        _qemu_nbd.start(argv)
    assert path.read_text() == "precious"


def test_start_replaces_a_stale_socket(tmp_path, images, exports):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    export = _qemu_nbd.start(_qemu_nbd.export_command(images["src"], socket=path))
    exports.append(export)
    assert_identical(images["src"], export.url)


def test_start_refuses_a_socket_in_use(tmp_path, images):
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen()
        with pytest.raises(_qemu_img.QemuError, match="in use by another process"):
            _qemu_nbd.start(_qemu_nbd.export_command(images["src"], socket=path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"socket": "relative.sock"}, "socket must be an absolute path"),
        ({"port": 0}, "port must be between 1 and 65535"),
        ({"port": 65536}, "port must be between 1 and 65535"),
        ({"shared": -1}, "shared must be 0"),
        ({"tls_certs": "certs"}, "tls_certs must be an absolute path"),
        ({"tls_certs": "/nonexistent"}, "tls_certs directory '/nonexistent' does not exist"),
    ],
)
def test_export_command_bad_input(images, kwargs, message):
    with pytest.raises(_qemu_img.QemuError, match=message):
        _qemu_nbd.export_command(images["src"], **kwargs)


def test_export_command_incomplete_tls_dir(tmp_path, pki, images):
    d = tmp_path / "certs"
    d.mkdir()
    shutil.copyfile(os.path.join(pki["server"], "ca-cert.pem"), d / "ca-cert.pem")
    with pytest.raises(_qemu_img.QemuError, match=r"lacks server-cert\.pem, server-key\.pem"):
        _qemu_nbd.export_command(images["src"], tls_certs=str(d))


def test_export_command_refuses_tls_source():
    with pytest.raises(_qemu_img.QemuError, match="TLS NBD source is not supported"):
        _qemu_nbd.export_command("nbds://127.0.0.1:10809/")


def test_find_foreign_export(tmp_path, images):
    # A qemu-nbd started by someone else, with short options.
    sock = str(tmp_path / "foreign.sock")
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-k", sock, "-xdisk", "-f", "qcow2", "-e", "2", images["qcow2"]]
    )
    try:
        deadline = time.monotonic() + 10
        while _qemu_nbd.find_export(("unix", sock)) is None or not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        found = _qemu_nbd.find_export(("unix", sock))
        assert found.pid == proc.pid
        assert (found.format, found.export_name, found.readonly) == ("qcow2", "disk", True)
        assert (found.image, found.shared) == (images["qcow2"], 2)
        assert found.url == f"nbd+unix:///disk?socket={sock}"
        assert _qemu_nbd.stop(found.pid) is True
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_refuses_other_processes():
    with pytest.raises(_qemu_img.QemuError, match=f"process {os.getpid()} is not qemu-nbd"):
        _qemu_nbd.stop(os.getpid())
    assert process_alive(os.getpid())


def test_stop_kills_a_stuck_server(tmp_path, images):
    sock = str(tmp_path / "stuck.sock")
    export = _qemu_nbd.start(_qemu_nbd.export_command(images["src"], socket=sock))
    os.kill(export.pid, signal.SIGSTOP)
    try:
        assert _qemu_nbd.stop(export.pid, timeout=0.5) is True
    finally:
        if process_alive(export.pid):
            os.kill(export.pid, signal.SIGKILL)
    assert not process_alive(export.pid)
    assert not os.path.exists(sock)
