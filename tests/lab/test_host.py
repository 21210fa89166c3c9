# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's host side against the real ovirt-imageio daemon, qemu-nbd and
nbdkit: PKI, storage domains, tickets, uploads and downloads through the
host, the proxy and the local unix socket."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from ovirt_imageio import client

from lab.host import Host, HostError, TicketError
from lab.pki import Pki, PkiError
from lab.storage import MiB, StorageDomain, StorageError, VolumeError

IMAGE_SIZE = 64 * MiB

# Data, zeros and holes at odd places, so that extents matter.
IMAGE_WRITES = [
    (0, 1 * MiB, 0x11),
    (3 * MiB + 64 * 1024, 2 * MiB, 0x22),
    (17 * MiB, 4 * MiB, 0x33),
    (40 * MiB, 1 * MiB, 0x00),
    (IMAGE_SIZE - MiB, MiB, 0x44),
]


# Fixtures.


class Lab:
    def __init__(self, path, pki, host):
        self.dir = path
        self.pki = pki
        self.host = host
        self.file_domain = StorageDomain.open(path, "nfs1", "file")
        self.block_domain = StorageDomain.open(path, "iscsi1", "block", size=4 * 1024 * MiB)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


def _lab(tmp_path_factory, pki, address):
    path = str(tmp_path_factory.mktemp("lab"))
    host = Host(path, pki, address=address, remove_timeout=2)
    host.start()
    try:
        yield Lab(path, pki, host)
    finally:
        host.stop()
        assert_no_leftovers(path, host)


@pytest.fixture(scope="module")
def remote_lab(tmp_path_factory, pki):
    """Clients reach the host on 127.0.0.2 from 127.0.0.1: a remote host."""
    yield from _lab(tmp_path_factory, pki, "127.0.0.2")


@pytest.fixture(scope="module")
def local_lab(tmp_path_factory, pki):
    """Clients share the host address 127.0.0.1: they run "on the host"."""
    yield from _lab(tmp_path_factory, pki, "127.0.0.1")


@pytest.fixture
def lab(remote_lab):
    yield remote_lab
    # Every test leaves the host as it found it.
    assert remote_lab.host.nbd_servers() == []
    assert remote_lab.host.tickets() == []


@pytest.fixture
def source(tmp_path):
    path = str(tmp_path / "source.qcow2")
    make_image(path, "qcow2", IMAGE_SIZE, IMAGE_WRITES)
    return path


# Helpers.


def make_image(path, fmt, size, writes):
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)], check=True)
    cmds = []
    for offset, length, pattern in writes:
        cmds += ["-c", f"write -P {pattern} {offset} {length}"]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, path], check=True, capture_output=True)


def qemu_img_compare(a, b):
    proc = subprocess.run(
        ["qemu-img", "compare", a, b], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def measure_required(path):
    out = subprocess.run(
        ["qemu-img", "measure", "--output", "json", "-O", "qcow2", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)["required"]


def new_ticket(url, size, ops, sparse=False):
    ticket_id = str(uuid.uuid4())
    return {
        "uuid": ticket_id,
        "size": size,
        "ops": ops,
        "url": url,
        "timeout": 300,
        "inactivity_timeout": 60,
        "transfer_id": str(uuid.uuid4()),
        "sparse": sparse,
    }


@contextlib.contextmanager
def nbd_ticket(host, volume, ops):
    """A ticket backed by qemu-nbd, set up and torn down as the engine does."""
    readonly = ops == ["read"]
    url = host.start_nbd(volume, readonly=readonly, discard=not readonly and volume.sparse)
    try:
        ticket = new_ticket(url, volume.capacity, ops, sparse=volume.sparse)
        host.add_ticket(ticket)
        try:
            yield ticket["uuid"]
        finally:
            assert host.remove_ticket(ticket["uuid"])
    finally:
        assert host.stop_nbd(url)
    assert not os.path.exists(url[len("nbd:unix:") :])


def server_checksum(url, cafile):
    """GET <transfer url>/checksum, as imageio clients do."""
    host, port = url.split("/")[2].rsplit(":", 1)
    path = "/" + url.split("/", 3)[3] + "/checksum"
    ctx = ssl.create_default_context(cafile=cafile)
    con = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        con.request("GET", path)
        resp = con.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return json.loads(body)
    finally:
        con.close()


def control_request(sock_path, method, path):
    con = http.client.HTTPConnection("localhost", timeout=10)
    con.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    con.sock.connect(sock_path)
    try:
        con.request(method, path)
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


def proxy_ticket(host, ticket_id):
    status, body = control_request(host.proxy_control_socket, "GET", "/tickets/" + ticket_id)
    assert status == 200, body
    return json.loads(body)


def data_clients(path, since):
    """Client addresses of the connections that moved image data, from the
    daemon log after offset since ("local" is the unix socket)."""
    with open(path) as f:
        f.seek(since)
        text = f.read()
    return {
        line.split("client=")[1].split()[0]
        for line in text.splitlines()
        if " CLOSE connection=" in line
        and any(f" [{op} " in line for op in ("read", "write", "zero"))
    }


def read(path):
    with open(path) as f:
        return f.read()


def log_size(path):
    return os.path.getsize(path)


def daemon_log(lab):
    return os.path.join(lab.dir, "log", f"imageio-{lab.host.name}.log")


def lab_processes(path):
    """Live processes whose command line mentions path (zombies excluded)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if path in cmdline and state != "Z":
            found.append((int(pid), cmdline))
    return found


def sockets_under(path):
    found = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if os.path.exists(full) and os.stat(full).st_mode & 0o170000 == 0o140000:
                found.append(full)
    return found


def assert_no_leftovers(path, host):
    assert lab_processes(path) == []
    assert lab_processes(host.run_dir) == []
    assert sockets_under(path) == []
    assert sockets_under(host.run_dir) == []
    assert not os.path.exists(host.pid_dir) or os.listdir(host.pid_dir) == []


# PKI.


def test_pki_certificates_work_with_openssl_and_gnutls(tmp_path):
    pki = Pki(str(tmp_path / "pki"))
    cert, key = pki.issue("server", hosts=("localhost", "127.0.0.1", "127.0.0.2"))
    assert pki.issue("server", hosts=("localhost", "127.0.0.1", "127.0.0.2")) == (cert, key)
    # Reissued when asked for other names, so no stale certificate is served.
    before = read(cert)
    pki.issue("server", hosts=("localhost",))
    assert read(cert) != before
    pki.issue("server", hosts=("localhost", "127.0.0.1", "127.0.0.2"))
    assert os.stat(key).st_mode & 0o077 == 0

    text = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-text"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:localhost, IP Address:127.0.0.1, IP Address:127.0.0.2" in text
    assert "TLS Web Server Authentication" in text
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", pki.ca_cert, "-purpose", "sslserver", cert],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr

    # GnuTLS (qemu): qemu-nbd with TLS, verifying a client certificate.
    server_dir = pki.qemu_dir("server", str(tmp_path / "qemu-server"))
    client_dir = pki.qemu_dir("client", str(tmp_path / "qemu-client"))
    assert sorted(os.listdir(server_dir)) == ["ca-cert.pem", "server-cert.pem", "server-key.pem"]
    assert sorted(os.listdir(client_dir)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    image = str(tmp_path / "disk.qcow2")
    make_image(image, "qcow2", 8 * MiB, [(0, MiB, 0x5A)])
    sock = str(tmp_path / "nbd.sock")
    server_creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=on"
    client_creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}"
    nbd_argv = ["qemu-nbd", "--socket", sock, "--persistent", "--format", "qcow2"]
    nbd_argv += ["--object", server_creds, "--tls-creds", "tls0", image]
    server = subprocess.Popen(nbd_argv)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        remote = f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0"
        remote += ",tls-hostname=localhost"
        local = f"driver=qcow2,file.driver=file,file.filename={image}"
        proc = subprocess.run(
            ["qemu-img", "compare", "-U", "--object", client_creds, "--image-opts", remote, local],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        server.terminate()
        server.wait()

    # OpenSSL (Python ssl): a TLS handshake checking the host name.
    context = ssl.create_default_context(cafile=pki.ca_cert)
    listener = socket.create_server(("127.0.0.2", 0))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    port = listener.getsockname()[1]

    def accept():
        conn = listener.accept()[0]
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.2", port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.2") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
    finally:
        thread.join()
        listener.close()


def test_pki_rejects_bad_requests(tmp_path):
    pki = Pki(str(tmp_path / "pki"))
    with pytest.raises(PkiError, match="Invalid certificate name"):
        pki.issue("../evil")
    with pytest.raises(PkiError, match="server or client"):
        pki.issue("nothing", server=False, client=False)
    with pytest.raises(PkiError, match="Invalid host name"):
        pki.issue("comma", hosts=("a,b",))
    with pytest.raises(PkiError, match="Invalid qemu TLS role"):
        pki.qemu_dir("peer", str(tmp_path / "q"))
    assert sorted(f for f in os.listdir(pki.directory) if not f.startswith(".")) == [
        "ca-cert.pem",
        "ca-key.pem",
    ]
    # Reopening keeps the same CA.
    before = read(pki.ca_cert)
    assert read(Pki(pki.directory).ca_cert) == before


# Storage domains.


def test_volumes_follow_vdsm_rules(tmp_path):
    lab_dir = str(tmp_path)
    block = StorageDomain.open(lab_dir, "iscsi1", "block", size=3072 * MiB)
    nfs = StorageDomain.open(lab_dir, "nfs1", "file")

    sparse = block.create_volume(str(uuid.uuid4()), "qcow2", 10 * 1024 * MiB, True)
    assert sparse.lv_size == 2560 * MiB  # one utilization chunk
    with pytest.raises(VolumeError, match="Not enough free space"):
        block.create_volume(str(uuid.uuid4()), "raw", 4096 * MiB, False)
    block.remove_volume(sparse.id)

    small = block.create_volume(str(uuid.uuid4()), "qcow2", 1024 * MiB, True, initial_size=MiB)
    assert small.lv_size == 128 * MiB
    assert os.path.getsize(small.path) == small.lv_size
    assert small.actual_size() == small.lv_size
    big = block.create_volume(str(uuid.uuid4()), "qcow2", 1024 * MiB, True, initial_size=200 * MiB)
    assert big.lv_size == 256 * MiB  # 200 MiB * 1.1 rounded up to extents
    raw = block.create_volume(str(uuid.uuid4()), "raw", 100 * MiB, False)
    assert raw.capacity == raw.lv_size == 128 * MiB  # a raw LV is the disk
    for volume in (small, big, raw):
        volume.verify()

    for args, message in [
        (("raw", MiB, True), "Sparse raw volumes are not supported"),
        (("raw", 200 * MiB, False, MiB), "Initial size is not supported for raw"),
        (("qcow2", 100 * MiB, True, 1024 * MiB), "bigger than the maximum size"),
        (("vmdk", MiB, True), "Invalid volume format"),
        (("qcow2", -1, True), "Invalid capacity"),
    ]:
        with pytest.raises(VolumeError, match=message):
            block.create_volume(str(uuid.uuid4()), *args)
    for args, message in [
        (("qcow2", MiB, True, MiB), "not supported for qcow2"),
        (("raw", MiB, True, MiB), "not supported for sparse"),
        (("raw", MiB, False, 2 * MiB), "out of range"),
    ]:
        with pytest.raises(VolumeError, match=message):
            nfs.create_volume(str(uuid.uuid4()), *args)
    with pytest.raises(VolumeError, match="already exists"):
        block.create_volume(small.id, "qcow2", MiB, True)
    with pytest.raises(VolumeError, match="Invalid volume id"):
        nfs.create_volume("../escape", "raw", MiB, False)

    sparse_raw = nfs.create_volume(str(uuid.uuid4()), "raw", 10 * MiB + 1, True)
    assert sparse_raw.capacity == 10 * MiB + 4096
    assert sparse_raw.actual_size() < MiB
    full_raw = nfs.create_volume(str(uuid.uuid4()), "raw", 10 * MiB, False)
    assert full_raw.actual_size() >= 10 * MiB

    # Failed requests left nothing behind; metadata survives a new process.
    ids = sorted(v.id for v in block.volumes())
    assert ids == sorted([small.id, big.id, raw.id])
    assert sorted(os.listdir(block.volumes_dir)) == sorted(ids + [i + ".meta" for i in ids])
    script = textwrap.dedent(
        f"""
        import json
        from lab.storage import StorageDomain
        d = StorageDomain.open({lab_dir!r}, "iscsi1")
        print(json.dumps([[v.id, v.format, v.capacity, v.lv_size] for v in d.volumes()]))
        print(json.dumps(d.stats()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert sorted(tuple(v) for v in json.loads(out[0])) == sorted(
        (v.id, v.format, v.capacity, v.lv_size) for v in block.volumes()
    )
    stats = json.loads(out[1])
    assert stats["used"] == (128 + 256 + 128) * MiB
    assert stats["available"] == 3072 * MiB - stats["used"]
    assert stats["committed"] == 1024 * MiB * 2 + 128 * MiB

    # Extending: qcow2 grows inside its LV, a raw LV grows with the disk.
    small.extend(2048 * MiB)
    assert block.volume(small.id).capacity == 2048 * MiB
    small.verify()
    assert os.path.getsize(small.path) == small.lv_size == 128 * MiB
    raw.extend(129 * MiB)
    assert raw.capacity == raw.lv_size == os.path.getsize(raw.path) == 256 * MiB
    full_raw.extend(12 * MiB)
    assert full_raw.actual_size() >= 12 * MiB
    with pytest.raises(VolumeError, match="cannot shrink"):
        full_raw.extend(MiB)

    with pytest.raises(StorageError, match="is a block domain"):
        StorageDomain.open(lab_dir, "iscsi1", "file")
    with pytest.raises(StorageError, match="does not exist"):
        StorageDomain.open(lab_dir, "missing")
    assert [d.name for d in StorageDomain.list(lab_dir)] == ["iscsi1", "nfs1"]


def test_verify_catches_wrong_content(tmp_path, source):
    nfs = StorageDomain.open(str(tmp_path), "nfs1", "file")
    volume = nfs.create_volume(str(uuid.uuid4()), "qcow2", IMAGE_SIZE, True)
    volume.verify()
    # What a file-backend upload of raw bytes into a qcow2 disk leaves.
    with open(volume.path, "r+b") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(VolumeError, match="format detected by qemu is raw"):
        volume.verify()

    small = nfs.create_volume(str(uuid.uuid4()), "qcow2", IMAGE_SIZE // 2, True)
    subprocess.run(["cp", source, small.path], check=True)
    with pytest.raises(VolumeError, match="bigger than volume capacity"):
        small.verify()


def test_block_qcow2_cannot_outgrow_its_lv(tmp_path):
    """qemu's raw driver with size= behaves like the end of an LV."""
    block = StorageDomain.open(str(tmp_path), "iscsi1", "block")
    volume = block.create_volume(str(uuid.uuid4()), "qcow2", 1024 * MiB, True, initial_size=MiB)
    proc = subprocess.run(
        ["qemu-io", "-c", "write -P 0x77 0 200M", volume.qemu_json()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "No space left on device" in proc.stdout + proc.stderr
    assert os.path.getsize(volume.path) == volume.lv_size
    subprocess.run(["qemu-img", "check", volume.qemu_json()], check=True, capture_output=True)


# Transfers through the real daemons.


def block_volume_for(lab, image):
    return lab.block_domain.create_volume(
        str(uuid.uuid4()), "qcow2", IMAGE_SIZE, True, initial_size=measure_required(image)
    )


@pytest.mark.parametrize("kind", ["file", "block"])
@pytest.mark.parametrize("via", ["transfer_url", "proxy_url"])
def test_upload_download_round_trip(lab, source, tmp_path, kind, via):
    if kind == "file":
        volume = lab.file_domain.create_volume(str(uuid.uuid4()), "qcow2", IMAGE_SIZE, True)
    else:
        volume = block_volume_for(lab, source)
    expected = client.checksum(source)
    daemon_log_start = log_size(daemon_log(lab))

    with nbd_ticket(lab.host, volume, ["write"]) as ticket_id:
        url = getattr(lab.host, via)(ticket_id)
        client.upload(source, url, lab.pki.ca_cert, disk_is_zero=True)
        assert lab.host.get_ticket(ticket_id)["transferred"] > 0
        proxied = proxy_ticket(lab.host, ticket_id)["transferred"]
        assert (proxied > 0) == (via == "proxy_url")

    # A remote client (or the proxy) sends data over TCP, not the local socket.
    assert data_clients(daemon_log(lab), daemon_log_start) == {"127.0.0.1"}
    qemu_img_compare(source, volume.qemu_json())
    volume.verify()
    if kind == "block":
        assert os.path.getsize(volume.path) == volume.lv_size

    downloaded = str(tmp_path / "downloaded.qcow2")
    with nbd_ticket(lab.host, volume, ["read"]) as ticket_id:
        url = getattr(lab.host, via)(ticket_id)
        client.download(url, downloaded, lab.pki.ca_cert, fmt="qcow2")
        assert server_checksum(url, lab.pki.ca_cert) == expected
    qemu_img_compare(source, downloaded)
    assert volume.checksum() == expected
    assert client.checksum(downloaded) == expected


def test_upload_on_the_host_uses_the_local_socket(local_lab, source, tmp_path):
    lab = local_lab
    volume = block_volume_for(lab, source)
    start = log_size(daemon_log(lab))
    with nbd_ticket(lab.host, volume, ["write"]) as ticket_id:
        client.upload(source, lab.host.transfer_url(ticket_id), lab.pki.ca_cert)
    # Data goes over the unix socket the daemon announced in OPTIONS.
    assert data_clients(daemon_log(lab), start) == {"local"}
    qemu_img_compare(source, volume.qemu_json())

    downloaded = str(tmp_path / "downloaded.raw")
    start = log_size(daemon_log(lab))
    with nbd_ticket(lab.host, volume, ["read"]) as ticket_id:
        client.download(lab.host.transfer_url(ticket_id), downloaded, lab.pki.ca_cert, fmt="raw")
    assert data_clients(daemon_log(lab), start) == {"local"}
    qemu_img_compare(source, downloaded)
    assert volume.checksum() == client.checksum(source)
    assert lab.host.nbd_servers() == []
    assert lab.host.tickets() == []


def test_file_backend_ticket(lab, tmp_path):
    """A ``file://`` ticket: imageio writes the raw bytes of the volume with
    O_DIRECT, as for a ``format=cow`` transfer."""
    source = str(tmp_path / "source.raw")
    make_image(source, "raw", 16 * MiB, [(MiB, 3 * MiB, 0x61), (9 * MiB + 4096, 4096, 0x62)])
    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "raw", 16 * MiB, True)
    ticket = new_ticket("file://" + volume.path, volume.capacity, ["write"], sparse=True)
    lab.host.add_ticket(ticket)
    try:
        client.upload(source, lab.host.proxy_url(ticket["uuid"]), lab.pki.ca_cert)
    finally:
        assert lab.host.remove_ticket(ticket["uuid"])
    volume.verify()
    qemu_img_compare(source, volume.qemu_json())
    assert volume.checksum() == client.checksum(source)


def test_block_volume_overflow_fails_the_upload(lab, tmp_path):
    source = str(tmp_path / "big.qcow2")
    # More data than the smallest LV (one 128 MiB extent) can hold.
    make_image(source, "qcow2", 1024 * MiB, [(0, 150 * MiB, 0x7E)])
    volume = lab.block_domain.create_volume(
        str(uuid.uuid4()), "qcow2", 1024 * MiB, True, initial_size=MiB
    )
    assert volume.lv_size == 128 * MiB
    start = log_size(daemon_log(lab))
    with nbd_ticket(lab.host, volume, ["write"]) as ticket_id:
        # imageio answers 500 and closes the connection; depending on timing
        # the client sees the reply or the closed connection.
        with pytest.raises((RuntimeError, OSError)) as e:
            client.upload(source, lab.host.transfer_url(ticket_id), lab.pki.ca_cert)
        if isinstance(e.value, RuntimeError):
            assert "500" in str(e.value)
    with open(daemon_log(lab)) as f:
        f.seek(start)
        assert "No space left on device" in f.read()
    assert os.path.getsize(volume.path) == volume.lv_size
    # The volume is still a consistent qcow2, just short of data.
    subprocess.run(["qemu-img", "check", volume.qemu_json()], check=True, capture_output=True)


def test_restart_imageio_midway(lab, source, tmp_path):
    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "raw", IMAGE_SIZE, True)
    raw_source = str(tmp_path / "source.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", source, raw_source], check=True)
    half = IMAGE_SIZE // 2
    with open(raw_source, "rb") as f:
        first, second = f.read(half), f.read()
    port = lab.host.port

    with nbd_ticket(lab.host, volume, ["write"]) as ticket_id:
        url = lab.host.transfer_url(ticket_id)
        old = client.ImageioClient(url, cafile=lab.pki.ca_cert)
        old.write(0, first)
        old.flush()
        before = lab.host.get_ticket(ticket_id)

        lab.host.restart_imageio()
        assert lab.host.port == port
        after = lab.host.get_ticket(ticket_id)
        assert after is not None
        assert after["ops"] == before["ops"] and after["url"] == before["url"]
        # The old connection died with the old daemon.
        with pytest.raises((OSError, RuntimeError, http.client.HTTPException)):
            old.write(half, second)
        old.close()

        with client.ImageioClient(url, cafile=lab.pki.ca_cert) as new:
            new.write(half, second)
            new.flush()

        lab.host.stop_imageio()
        with pytest.raises(HostError, match="does not answer"):
            lab.host.get_ticket(ticket_id)
        lab.host.start_imageio()
        assert lab.host.get_ticket(ticket_id)["uuid"] == ticket_id

    qemu_img_compare(raw_source, volume.qemu_json())


def test_ticket_in_use_is_not_removed(lab):
    """remove_ticket returns False on 409 while a slow write is running."""
    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "raw", 8 * MiB, True)
    lab.host.slow_storage(5000)
    try:
        url = lab.host.start_nbd(volume, readonly=False)
    finally:
        lab.host.slow_storage(0)
    assert len(lab.host.processes()) == 4  # two daemons, nbdkit, qemu-nbd
    ticket = new_ticket(url, volume.capacity, ["write"])
    lab.host.add_ticket(ticket)
    errors = []

    def write():
        try:
            with client.ImageioClient(
                lab.host.transfer_url(ticket["uuid"]), cafile=lab.pki.ca_cert
            ) as c:
                c.write(0, b"\x5c" * MiB)
                c.flush()
        except Exception as e:
            errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while not lab.host.get_ticket(ticket["uuid"])["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        assert lab.host.remove_ticket(ticket["uuid"]) is False
        assert time.monotonic() - started >= 1.5  # remove_timeout is 2 s
        assert lab.host.tickets() == [ticket["uuid"]]
    finally:
        writer.join()
    assert lab.host.remove_ticket(ticket["uuid"]) is True
    assert lab.host.get_ticket(ticket["uuid"]) is None
    assert lab.host.stop_nbd(url)
    assert len(lab.host.processes()) == 2


def test_bad_requests_leave_nothing_behind(lab, tmp_path):
    host = lab.host
    processes = sorted(host.processes())

    # A ticket the daemon refuses is not kept for re-adding.
    bad = new_ticket("nbd:unix:/nowhere.sock", MiB, ["write"])
    del bad["size"]
    with pytest.raises(TicketError, match="400") as e:
        host.add_ticket(bad)
    assert e.value.status == 400
    assert host.tickets() == []
    with pytest.raises(HostError, match="Invalid ticket"):
        host.add_ticket({"size": 1})
    assert host.get_ticket(str(uuid.uuid4())) is None
    assert host.remove_ticket(str(uuid.uuid4())) is True
    with pytest.raises(TicketError, match="404"):
        host.extend_ticket(str(uuid.uuid4()), 30)

    # qemu-nbd failing to open the volume: clear error, no process, no socket.
    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "qcow2", MiB, True)
    os.unlink(volume.path)
    with pytest.raises(HostError, match="exited while starting NBD server") as e:
        host.start_nbd(volume, readonly=True)
    assert "Could not open" in str(e.value)
    assert host.nbd_servers() == []

    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "qcow2", MiB, True)
    url = host.start_nbd(volume, readonly=True)
    with pytest.raises(HostError, match="already running"):
        host.start_nbd(volume, readonly=False)
    assert host.stop_nbd(url)
    assert host.stop_nbd(url) is False
    with pytest.raises(HostError, match="Invalid NBD server id"):
        host.start_nbd(volume, readonly=True, server_id="../x")

    assert sorted(host.processes()) == processes
    assert sockets_under(host.nbd_dir) == []

    with pytest.raises(HostError, match="loopback"):
        Host(str(tmp_path), lab.pki, address="192.0.2.1")
    with pytest.raises(HostError, match="loopback"):
        Host(str(tmp_path), lab.pki, proxy_address="example.com")


def test_extend_ticket(lab):
    volume = lab.file_domain.create_volume(str(uuid.uuid4()), "raw", MiB, True)
    with nbd_ticket(lab.host, volume, ["read"]) as ticket_id:
        expires = lab.host.get_ticket(ticket_id)["expires"]
        lab.host.extend_ticket(ticket_id, 3000)
        assert lab.host.get_ticket(ticket_id)["expires"] >= expires + 2000
        assert proxy_ticket(lab.host, ticket_id)["expires"] >= expires + 2000
        lab.host.restart_imageio()
        # Re-added with the extended timeout.
        assert lab.host.get_ticket(ticket_id)["timeout"] == 3000


# Life cycle.


def test_start_stop_cycles(tmp_path_factory, pki):
    path = str(tmp_path_factory.mktemp("cycles"))
    host = Host(path, pki)
    domain = StorageDomain.open(path, "nfs1", "file")
    volume = domain.create_volume(str(uuid.uuid4()), "qcow2", MiB, True)
    ports = set()
    for _round in range(3):
        host.start()
        ports.add(host.port)
        assert len(lab_processes(path)) == 2
        host.start_nbd(volume, readonly=True)
        host.add_ticket(new_ticket("file://" + volume.path, MiB, ["read"]))
        assert len(host.processes()) == 3
        host.stop()
        assert_no_leftovers(path, host)
        assert host.tickets() == [] and host.nbd_servers() == []
    # The host keeps its port while it is free, so URLs stay valid.
    assert len(ports) == 1
    # The host id survives a new Host object.
    assert Host(path, pki).id == host.id


def test_start_reaps_processes_of_a_crashed_lab(tmp_path_factory, pki):
    path = str(tmp_path_factory.mktemp("crash"))
    script = textwrap.dedent(
        f"""
        import os, uuid
        from lab.host import Host
        from lab.pki import Pki
        from lab.storage import StorageDomain
        host = Host({path!r}, Pki({pki.directory!r}))
        host.start()
        volume = StorageDomain.open({path!r}, "nfs1", "file").create_volume(
            str(uuid.uuid4()), "raw", 1048576, True)
        host.start_nbd(volume, readonly=True)
        print(" ".join(str(p) for p in host.processes()), flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    orphans = [int(p) for p in out.split()]
    assert len(orphans) == 3
    assert sorted(p for p, _flags in lab_processes(path)) == sorted(orphans)

    host = Host(path, pki)
    host.start()
    try:
        alive = {p for p, _flags in lab_processes(path)}
        assert alive.isdisjoint(orphans)
        assert len(alive) == 2
    finally:
        host.stop()
    assert_no_leftovers(path, host)


def test_long_lab_dir_gets_a_short_run_dir(tmp_path_factory, pki):
    """Unix socket paths are limited to 107 bytes; a deep lab directory puts
    its sockets in a short directory that stop() removes."""
    path = os.path.join(str(tmp_path_factory.mktemp("long")), "d" * 90)
    host = Host(path, pki)
    assert not host.run_dir.startswith(path)
    volume = StorageDomain.open(path, "nfs1", "file").create_volume(
        str(uuid.uuid4()), "qcow2", MiB, True
    )
    host.start()
    try:
        url = host.start_nbd(volume, readonly=False)
        assert len(url) - len("nbd:unix:") < 108
        # A writer holds the qcow2 volume: checksum says so at once.
        with pytest.raises(VolumeError, match="lock"):
            volume.checksum()
    finally:
        host.stop()
    assert not os.path.exists(host.run_dir)
    assert lab_processes(path) == []
