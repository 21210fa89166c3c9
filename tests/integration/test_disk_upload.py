# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""thinair.ovirt.disk_upload run by ansible-playbook against the lab.

Every upload is read back with disk_download and compared with the source by
qemu-img compare. Every failure is checked to leave nothing behind: no new
disk, no image transfer in a non-final phase, no qemu-nbd serving our files
(on the node or on the host), no temporary file or socket.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid

import pytest
from ovirt_imageio import client as imageio_client
from ovirtsdk4 import types

from lab.lab import Hooks, Lab
from lab.pki import Pki
from tests.helpers import running
from tests.integration import errors
from tests.integration.transfers import (
    IMAGE_SIZE,
    LabState,
    MiB,
    Modules,
    assert_cases_failed,
    assert_same,
    auth_of,
    failed,
    local_exports,
    make_full_raw,
    make_raw,
    ok,
    read_progress,
    run_in_background,
    wait_for,
    with_changes,
)

# The size of an LV extent on a block storage domain (vdsm's VG extent size).
BLOCK_EXTENT = 128 * MiB

# ISO 9660 (ECMA-119 8.1, 8.4): 2 KiB sectors; the primary volume
# descriptor is sector 16 and the descriptor set terminator follows it.
ISO_SECTOR = 2048
ISO_PVD_SECTOR = 16
# type, "CD001", version, unused, system id, volume id, unused, volume space
# size (little endian), the same (big endian).
ISO_PVD = struct.Struct("<B5sBx32s32s8xI4s")
ISO_TERMINATOR = struct.Struct("<B5sB")  # type 255, "CD001", version


# Images.


def make_iso(path, data_size=8 * MiB):
    """An ISO 9660 image: the volume descriptors, then data."""
    sectors = ISO_PVD_SECTOR + 2 + data_size // ISO_SECTOR
    system, volume = b"LINUX".ljust(32), b"THINAIR".ljust(32)
    pvd = ISO_PVD.pack(1, b"CD001", 1, system, volume, sectors, sectors.to_bytes(4, "big"))
    with open(path, "wb") as f:
        f.write(bytes(ISO_PVD_SECTOR * ISO_SECTOR))
        f.write(pvd.ljust(ISO_SECTOR, b"\0"))
        f.write(ISO_TERMINATOR.pack(255, b"CD001", 1).ljust(ISO_SECTOR, b"\0"))
        f.write(random.Random(7).randbytes(data_size))
    return str(path)


def convert(src, dst, fmt, *options):
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, src, dst],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(dst)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    top = tmp_path_factory.mktemp("images")
    raw = make_raw(top / "disk.raw")
    return {
        "raw": raw,
        "qcow2": convert(raw, top / "disk.qcow2", "qcow2"),
        "compressed": convert(raw, top / "compressed.qcow2", "qcow2", "-c"),
        "vmdk": convert(raw, top / "disk.vmdk", "vmdk"),
        "iso": make_iso(top / "install.iso"),
        "other": make_raw(top / "other.raw", seed=2),
    }


@pytest.fixture(scope="module")
def nbd_source(images, tmp_path_factory):
    """The qcow2 image exported read-only by qemu-nbd; yields its URL and pid."""
    sock = str(tmp_path_factory.mktemp("nbd") / "source.sock")
    cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=16", "--format=qcow2"]
    with running([*cmd, f"--socket={sock}", images["qcow2"]], sock) as proc:
        yield {"url": f"nbd+unix:///?socket={sock}", "pid": proc.pid, "raw": images["raw"]}


def source_of(images, nbd_source, kind):
    """(image to upload, raw image with the same guest data)."""
    if kind == "nbd":
        return nbd_source["url"], nbd_source["raw"]
    if kind == "iso":
        return images["iso"], images["iso"]
    return images[kind], images["raw"]


# Running the modules.


@pytest.fixture
def modules(ansible, lab, tmp_path):
    return Modules(ansible, auth_of(lab.info), tmp_path)


# The lab's state.


@pytest.fixture
def lab_state(lab, tmp_path):
    """The lab's state before the test; disks the test made are removed after it."""
    lab.hooks.clear_faults()
    state = LabState(lab, tmp_path)
    yield state
    lab.hooks.clear_faults()
    lab.hooks.slow_storage(0)
    state.remove_new_disks()


def disk_by_id(lab, disk_id):
    with contextlib.closing(lab.connection()) as con:
        return con.system_service().disks_service().disk_service(disk_id).get()


def create_disk(lab, name, size, storage_domain, initial_size=None):
    """An empty sparse qcow2 disk, made with the SDK as an administrator would."""
    with contextlib.closing(lab.connection()) as con:
        disks = con.system_service().disks_service()
        disk = disks.add(
            types.Disk(
                name=name,
                format=types.DiskFormat.COW,
                sparse=True,
                provisioned_size=size,
                initial_size=initial_size,
                storage_domains=[types.StorageDomain(name=storage_domain)],
            )
        )
        service = disks.disk_service(disk.id)
        deadline = time.monotonic() + 30
        while service.get().status != types.DiskStatus.OK:
            assert time.monotonic() < deadline, "the new disk did not become ok"
            time.sleep(0.1)
    return disk.id


# Round trips.

# Every kind of source, on file (nfs1) and block (iscsi1) storage; other
# tests cover the other pairs.
ROUND_TRIPS = [
    ("raw", "nfs1"),
    ("qcow2", "iscsi1"),
    ("compressed", "iscsi1"),
    ("vmdk", "nfs1"),
    ("iso", "iscsi1"),
    ("nbd", "nfs1"),
]


@pytest.mark.parametrize("kind, domain", ROUND_TRIPS)
def test_round_trip(modules, lab, lab_state, images, nbd_source, tmp_path, kind, domain):
    image, expected = source_of(images, nbd_source, kind)
    name = f"rt-{kind}-{domain}"
    dest = str(tmp_path / "back.qcow2")
    args = {"image": image, "storage_domain": domain, "name": name}
    first, again, forced, down, down_again = modules.run(
        modules.upload(**args),
        modules.upload(**args),
        modules.upload(force=True, **args),
        modules.download(name=name, dest=dest),
        modules.download(name=name, dest=dest),
    )

    ok(first, True)
    plan = first["plan"]
    size = os.path.getsize(expected)
    assert plan["provisioned_size"] == size
    assert (plan["name"], plan["storage_domain"]) == (name, domain)
    if kind == "iso":
        assert (plan["format"], plan["sparse"], plan["content_type"]) == ("raw", False, "iso")
        assert "initial_size" not in plan
    else:
        assert (plan["format"], plan["sparse"], plan["backup"]) == ("cow", True, "incremental")
        assert plan["content_type"] == "data"
        measured = json.loads(
            subprocess.run(
                ["qemu-img", "measure", "--output=json", "-O", "qcow2", image],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert plan["initial_size"] == measured["required"]
    disk = first["disk"]
    assert disk["status"] == "ok"
    assert (disk["name"], disk["storage_domain"], disk["format"]) == (name, domain, plan["format"])
    # A raw volume on block storage is whole extents (LVs), and the guest sees all of it.
    raw_on_block = plan["format"] == "raw" and domain == "iscsi1"
    disk_size = -(-size // BLOCK_EXTENT) * BLOCK_EXTENT if raw_on_block else size
    assert disk["provisioned_size"] == disk_size
    transfer = first["transfer"]
    assert transfer["endpoint"] == "host"
    assert transfer["url"].startswith(f"https://{lab.host_address}:")
    assert transfer["bytes"] == disk_size
    assert transfer["data_bytes"] + transfer["zero_bytes"] == disk_size
    if kind != "iso":
        # Holes and zeros are skipped on a new disk, not sent.
        assert transfer["data_bytes"] < size // 2

    ok(again, False)
    assert again["disk"]["id"] == disk["id"]
    assert "transfer" not in again
    ok(forced, True)
    assert forced["disk"]["id"] == disk["id"]
    assert forced["transfer"]["bytes"] == disk_size

    ok(down, True)
    assert down["disk"]["id"] == disk["id"]
    ok(down_again, False)
    assert_same(expected, dest)
    lab_state.assert_nothing_left(disks={disk["id"]})


# How the image is read: each kind's qemu-img runs, in order.
QEMU_IMG_RUNS = {
    "raw": ["info"],
    "qcow2": ["info", "check", "map"],
    "compressed": ["info", "check"],
}


@pytest.mark.parametrize("kind", sorted(QEMU_IMG_RUNS))
def test_upload_opens_the_image_once(modules, lab, lab_state, images, tmp_path, kind):
    """qemu-img looks at the image once for the plan and the copy: info,
    and for a qcow2 image check and, when the copy reads its file, map."""
    log = tmp_path / "qemu-img.log"
    shim = tmp_path / "bin"
    shim.mkdir()
    real = shutil.which("qemu-img")
    (shim / "qemu-img").write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {real} "$@"\n')
    (shim / "qemu-img").chmod(0o755)
    modules.ansible.env["PATH"] = f"{shim}{os.pathsep}{modules.ansible.env['PATH']}"
    name = f"once-{kind}"
    result = modules.run_one(modules.upload(image=images[kind], storage_domain="iscsi1", name=name))
    ok(result, True)
    assert log.read_text().split() == QEMU_IMG_RUNS[kind]
    dest = str(tmp_path / "back.raw")
    ok(modules.run_one(modules.download(name=name, dest=dest, format="raw")), True)
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={result["disk"]["id"]})


def test_existing_disk_by_id_and_name(modules, lab, lab_state, images, tmp_path):
    size = os.path.getsize(images["raw"])
    disk_id = create_disk(lab, "existing-1", size, "nfs1")
    new_id = str(uuid.uuid4())
    new_args = {"image": images["vmdk"], "disk_id": new_id, "storage_domain": "iscsi1"}
    dest, new_dest = str(tmp_path / "existing.qcow2"), str(tmp_path / "given-id.raw")
    results = modules.run(
        modules.upload(image=images["qcow2"], disk_id=disk_id),
        modules.upload(image=images["qcow2"], disk_id=disk_id),
        modules.upload(image=images["raw"], name="existing-1"),
        modules.upload(image=images["other"], name="existing-1"),
        modules.upload(image=images["other"], disk_id=disk_id),
        modules.download(disk_id=disk_id, dest=dest),
        # disk_id of a disk that does not exist yet: the id of the new disk.
        modules.upload(name="given-id", **new_args),
        modules.upload(**new_args),
        modules.download(disk_id=new_id, dest=new_dest, format="raw"),
    )
    by_id, by_id_again, by_name, other_by_name, other_again, down = results[:6]
    new, new_again, new_down = results[6:]
    ok(by_id, True)
    assert by_id["plan"] == {"disk_id": disk_id, "name": "existing-1", "existing": True}
    assert by_id["disk"]["id"] == disk_id
    # An existing disk may hold anything: zeros are written, not skipped.
    assert by_id["transfer"]["data_bytes"] + by_id["transfer"]["zero_bytes"] == size
    ok(by_id_again, False)
    # The same guest data from another format is the same disk content.
    ok(by_name, False)
    assert by_name["disk"]["id"] == disk_id
    ok(other_by_name, True)
    ok(other_again, False)
    ok(down, True)
    assert_same(images["other"], dest)

    ok(new, True)
    assert (new["disk"]["id"], new["disk"]["name"]) == (new_id, "given-id")
    ok(new_again, False)
    ok(new_down, True)
    assert_same(images["raw"], new_dest)
    lab_state.assert_nothing_left(disks={disk_id, new_id})


def test_existing_larger_disk(modules, lab, lab_state, images, tmp_path):
    """A disk larger than the image reads as the image, then zeros: what it
    held past the image's end is zeroed, and a second run changes nothing."""
    size = 48 * MiB
    big = make_raw(tmp_path / "big.raw", size=size, seed=9)
    disk_id = create_disk(lab, "larger", size, "iscsi1")
    dest = str(tmp_path / "larger.raw")
    filled, first, again, down = modules.run(
        modules.upload(image=big, disk_id=disk_id),
        modules.upload(image=images["qcow2"], disk_id=disk_id),
        modules.upload(image=images["qcow2"], name="larger"),
        modules.download(disk_id=disk_id, dest=dest, format="raw"),
    )
    ok(filled, True)
    ok(first, True)
    assert first["transfer"]["bytes"] == size
    ok(again, False)
    ok(down, True)
    assert os.path.getsize(dest) == size
    # qemu-img compare takes a larger image as equal only if its tail reads as zeros.
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={disk_id})


def test_formats_on_request(modules, lab, lab_state, images, tmp_path):
    cases = {
        # name: (upload options, disk format, sparse, backup)
        "f-raw": ({"storage_domain": "nfs1", "format": "raw"}, "raw", True, "none"),
        "f-raw-block": (
            {"storage_domain": "iscsi1", "format": "raw", "preallocated": True},
            "raw",
            False,
            "none",
        ),
        "f-qcow2-pre": (
            {"storage_domain": "iscsi1", "preallocated": True},
            "cow",
            False,
            "incremental",
        ),
    }
    tasks = [modules.upload(image=images["qcow2"], name=n, **c[0]) for n, c in cases.items()]
    tasks += [
        modules.download(name=n, dest=str(tmp_path / f"{n}.raw"), format="raw") for n in cases
    ]
    results = modules.run(*tasks)
    for (_options, fmt, sparse, backup), up, down in zip(
        cases.values(), results[: len(cases)], results[len(cases) :], strict=True
    ):
        ok(up, True)
        assert (up["plan"]["format"], up["plan"]["sparse"], up["plan"]["backup"]) == (
            fmt,
            sparse,
            backup,
        )
        assert (up["disk"]["format"], up["disk"]["sparse"]) == (fmt, sparse)
        volume = lab.hooks.volume(up["disk"]["id"])
        assert (volume["format"], volume["sparse"]) == ({"raw": "raw", "cow": "qcow2"}[fmt], sparse)
        ok(down, True)
        assert_same(images["raw"], down["dest"])
    lab_state.assert_nothing_left(disks={r["disk"]["id"] for r in results[: len(cases)]})


def test_check_mode(modules, lab, lab_state, images, tmp_path):
    planned, made, would, same = modules.run(
        dict(
            modules.upload(image=images["compressed"], storage_domain="iscsi1", name="planned"),
            check_mode=True,
        ),
        modules.upload(image=images["raw"], storage_domain="nfs1", name="cm"),
        # An existing disk with other data: the upload would change it, and does not.
        dict(modules.upload(image=images["other"], name="cm"), check_mode=True),
        dict(modules.upload(image=images["qcow2"], name="cm"), check_mode=True),
    )
    ok(planned, True)
    assert planned["plan"]["name"] == "planned"
    assert planned["plan"]["storage_domain"] == "iscsi1"
    assert planned["plan"]["format"] == "cow"
    assert planned["plan"]["initial_size"] > 0
    assert "disk" not in planned and "transfer" not in planned

    disk_id = ok(made, True)["disk"]["id"]
    ok(would, True)
    assert would["plan"] == {"disk_id": disk_id, "name": "cm", "existing": True}
    assert "transfer" not in would
    ok(same, False)
    assert lab.hooks.checksum(disk_id) == imageio_client.checksum(images["raw"])
    # The one upload is the real one; check mode only read the disk.
    assert len(lab_state.new_transfers("upload")) == 1
    lab_state.assert_nothing_left(disks={disk_id})


def test_verify(modules, lab, lab_state, images, tmp_path):
    dest = str(tmp_path / "verified.raw")
    up, down = modules.run(
        modules.upload(image=images["compressed"], storage_domain="iscsi1", verify=True),
        modules.download(name="compressed", dest=dest, format="raw", verify=True),
    )
    ok(up, True)
    assert up["disk"]["name"] == "compressed"
    ok(down, True)
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={up["disk"]["id"]})


# Ways to reach imageio.


def test_proxy_always(modules, lab, lab_state, images, tmp_path):
    dest = str(tmp_path / "proxy.qcow2")
    up, again, down = modules.run(
        modules.upload(image=images["qcow2"], storage_domain="iscsi1", proxy="always"),
        modules.upload(image=images["qcow2"], storage_domain="iscsi1", proxy="always"),
        modules.download(name="disk", dest=dest, proxy="always"),
    )
    ok(up, True)
    assert up["transfer"]["endpoint"] == "proxy"
    assert not up["transfer"]["url"].startswith(f"https://{lab.host_address}:")
    ok(again, False)
    ok(down, True)
    assert down["transfer"]["endpoint"] == "proxy"
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={up["disk"]["id"]})


class UnreachableHostRelay:
    """An HTTPS relay to the lab engine that points the transfer_url of every
    image transfer at a port where nothing listens.

    It stands for a network where the client reaches the engine, and so the
    engine's imageio proxy, but not the hosts (a firewall between them). The
    engine, the proxy and the host daemon stay the lab's own.
    """

    def __init__(self, lab):
        pki = Pki(os.path.join(lab.dir, "pki"))
        cert, key = pki.issue("upload-test-relay", hosts=("localhost", "127.0.0.1"))
        parts = urllib.parse.urlsplit(lab.engine_url)
        self.dead_port = closed_port(lab.host_address)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                relay.forward(self)

            do_POST = do_PUT = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        self.engine = (parts.hostname, parts.port)
        self.client_context = ssl.create_default_context(cafile=lab.ca_file)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        self.server.socket = server_context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}{parts.path}"
        self.rewritten = 0
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def forward(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        skip = ("host", "connection", "content-length", "accept-encoding")
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
        con = http.client.HTTPSConnection(*self.engine, context=self.client_context, timeout=60)
        try:
            con.request(handler.command, handler.path, body=body, headers=headers)
            resp = con.getresponse()
            data = resp.read()
        finally:
            con.close()
        data, count = re.subn(
            rb"(<transfer_url>https://[^<]*?:)\d+/", rb"\g<1>%d/" % self.dead_port, data
        )
        self.rewritten += count
        handler.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def closed_port(address):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_host(lab):
    relay = UnreachableHostRelay(lab)
    yield relay
    relay.close()


def test_proxy_auto_when_host_unreachable(
    modules, lab, lab_state, images, tmp_path, unreachable_host
):
    modules.auth = dict(modules.auth, url=unreachable_host.url)
    dest = str(tmp_path / "fallback.raw")
    mine = create_disk(lab, "mine", IMAGE_SIZE, "nfs1")
    refused, refused_existing, up, down = modules.run(
        modules.upload(image=images["qcow2"], storage_domain="nfs1", proxy="never"),
        modules.upload(image=images["qcow2"], disk_id=mine, proxy="never", force=True),
        modules.upload(image=images["qcow2"], storage_domain="nfs1"),
        modules.download(name="disk", dest=dest, format="raw"),
    )
    for result in (refused, refused_existing):
        failed(result, "Cannot reach imageio: host https://")
        assert f":{unreachable_host.dead_port}/images/" in result["msg"]
        assert "Connection refused" in result["msg"]
    # The engine removes the disk of a cancelled upload: the user's disk is
    # finalized instead, and stays.
    assert disk_by_id(lab, mine).status.value == "ok"
    ok(up, True)
    assert up["transfer"]["endpoint"] == "proxy"
    ok(down, True)
    assert down["transfer"]["endpoint"] == "proxy"
    assert unreachable_host.rewritten >= 4
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={up["disk"]["id"], mine})


@pytest.fixture(scope="module")
def local_lab(tmp_path_factory):
    """A small second lab whose host listens on 127.0.0.1, this machine's own
    address: the module then runs "on the host" and uses imageio's unix socket."""
    lab = Lab(str(tmp_path_factory.mktemp("local-lab")))
    info = lab.start(host_address="127.0.0.1", poll_interval=0.5)
    try:
        yield info
    finally:
        lab.stop()


def test_unix_socket(ansible, local_lab, images, tmp_path):
    modules = Modules(ansible, auth_of(local_lab), tmp_path)
    hooks = Hooks(local_lab["hooks_url"], local_lab["ca_file"])
    block_dest, file_dest = str(tmp_path / "unix.qcow2"), str(tmp_path / "unix.raw")
    block, file, file_again, block_down, file_down = modules.run(
        modules.upload(image=images["compressed"], storage_domain="iscsi1", name="u-block"),
        modules.upload(image=images["vmdk"], storage_domain="nfs1", name="u-file"),
        modules.upload(image=images["raw"], storage_domain="nfs1", name="u-file"),
        modules.download(name="u-block", dest=block_dest),
        modules.download(name="u-file", dest=file_dest, format="raw"),
    )
    for result in (block, file, block_down, file_down):
        ok(result, True)
        assert result["transfer"]["endpoint"] == "unix"
        assert result["transfer"]["url"].startswith("https://127.0.0.1:")
    ok(file_again, False)
    assert_same(images["raw"], block_dest)
    assert_same(images["raw"], file_dest)
    # The lab is removed with its directory: its disks may stay.
    state = hooks.settled()
    assert state["nbd_servers"] == [] and state["tickets"] == []
    assert local_exports(tmp_path) == []
    assert os.listdir(modules.tmpdir) == []


# Faults.


def test_imageio_restarts_mid_transfer(modules, lab, lab_state, tmp_path):
    """The host's imageio daemon restarts twice while an upload moves data,
    once while a download does: every request is idempotent, so the cut ones
    are sent again on new connections and both complete, identical; the
    results tell what was retried."""
    progress = tmp_path / "progress.json"
    image = make_full_raw(tmp_path / "busy.raw", 64 * MiB, 48 * MiB)
    dest = tmp_path / "busy.qcow2"
    # Slow storage and small requests keep the copy going for seconds.
    lab.hooks.slow_storage(20)

    def restart_while_copying(phase, times):
        wait_for(
            lambda: (read_progress(progress) or {}).get("phase") == phase,
            what=f"the {phase} to start",
        )
        for _restart in range(times):
            time.sleep(0.5)
            lab.hooks.imageio("restart")

    join = run_in_background(
        modules,
        modules.upload(
            image=image, storage_domain="nfs1", name="restarted", buffer_size=65536,
            progress_file=str(progress),
        ),
    )  # fmt: skip
    restart_while_copying("uploading", 2)
    (up,) = join()
    ok(up, True)
    join = run_in_background(
        modules,
        modules.download(
            name="restarted", dest=str(dest), buffer_size=65536, progress_file=str(progress)
        ),
    )
    restart_while_copying("downloading", 1)
    (down,) = join()
    ok(down, True)
    lab.hooks.slow_storage(0)
    assert_same(image, dest)
    for result in (up, down):
        assert result["transfer"]["retries"], result["transfer"]
        for line in result["transfer"]["retries"]:
            assert "succeeded when sent again" in line, line
    lab_state.assert_nothing_left(disks={up["disk"]["id"]}, imageio_restarted=True)


@pytest.mark.parametrize("direction", ["upload", "download"])
@pytest.mark.parametrize(
    "signo, whom", [(signal.SIGTERM, "process"), (signal.SIGINT, "group")], ids=["kill", "ctrl-c"]
)
def test_stopped_by_a_signal(modules, lab, lab_state, tmp_path, direction, signo, whom):
    """ansible-playbook is stopped while data moves, by kill (SIGTERM to it)
    or a terminal's Ctrl-C (SIGINT to its process group); Ansible passes the
    signal on to the module. Within 5 s nothing is left: an upload's transfer
    is cancelled and its new disk removed, a download's transfer finalized
    and its partial file removed; no ticket, no qemu-nbd, no module."""
    image = make_full_raw(tmp_path / "stopped.raw", 64 * MiB, 48 * MiB)
    progress = tmp_path / "progress.json"
    dest = tmp_path / "stopped.qcow2"
    keep = set()
    if direction == "upload":
        task = modules.upload(
            image=image, storage_domain="nfs1", name="stopped", buffer_size=65536,
            progress_file=str(progress),
        )  # fmt: skip
    else:
        disk = ok(modules.run_one(modules.upload(image=image, storage_domain="nfs1")), True)
        keep = {disk["disk"]["id"]}
        task = modules.download(
            disk_id=disk["disk"]["id"], dest=str(dest), buffer_size=65536,
            progress_file=str(progress),
        )  # fmt: skip
    # Slow storage and small requests keep the copy going for seconds.
    lab.hooks.slow_storage(20)
    playbook = modules.ansible.start([task])
    try:
        wait_for(
            lambda: (read_progress(progress) or {}).get("phase") == direction + "ing",
            what=f"the {direction} to start",
        )
        time.sleep(0.3)
        if whom == "group":
            os.killpg(playbook.pid, signo)
        else:
            playbook.send_signal(signo)

        def nothing_left():
            try:
                lab_state.assert_nothing_left(disks=keep)
            except AssertionError:
                return False
            return not modules_running(modules) and not progress.exists()

        wait_for(nothing_left, timeout=5, what="nothing left of the stopped " + direction)
    finally:
        playbook.kill()
        playbook.wait()
    assert not dest.exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    (transfer,) = lab_state.new_transfers(direction)
    phases = lab.hooks.states(transfer.id)
    if direction == "upload":
        assert "cancelled_user" in phases
        assert phases[-1] == "finished_failure"
    else:
        assert phases[-1] == "finished_success"


def test_killed_module_is_cleaned_up_by_the_next_run(modules, lab, lab_state, tmp_path):
    """SIGKILL cannot be caught: the upload's transfer stays open and its
    new disk locked. The next transfer module run on the node ends it first,
    as the killed module would have, and says so."""
    image = make_full_raw(tmp_path / "killed.raw", 64 * MiB, 48 * MiB)
    progress = tmp_path / "progress.json"
    lab.hooks.slow_storage(20)
    playbook = modules.ansible.start(
        [
            modules.upload(
                image=image, storage_domain="nfs1", name="killed", buffer_size=65536,
                progress_file=str(progress),
            )
        ]
    )  # fmt: skip
    try:
        wait_for(
            lambda: (read_progress(progress) or {}).get("phase") == "uploading",
            what="the upload to start",
        )
        for pid in modules_running(modules):
            os.kill(pid, signal.SIGKILL)
        os.killpg(playbook.pid, signal.SIGKILL)
    finally:
        playbook.wait()
    lab.hooks.slow_storage(0)
    wait_for(lambda: not modules_running(modules), what="the module to be gone")
    (left,) = [d for d in lab.hooks.state()["disks"] if d["alias"] == "killed"]
    assert left["status"] == "locked"
    (transfer,) = lab_state.new_transfers("upload")
    assert str(transfer.phase) == "transferring"

    # Any transfer module run next; here, the same upload again.
    result = ok(
        modules.run_one(modules.upload(image=image, storage_domain="nfs1", name="killed")), True
    )
    (line,) = result["stale_transfers"]
    assert line.startswith(f"cancelled transfer {transfer.id} of disk {left['id']}, left open by")
    assert line.endswith("; the engine removed the new disk")
    assert "cancelled_user" in lab.hooks.states(transfer.id)
    assert result["disk"]["id"] != left["id"]
    progress.unlink(missing_ok=True)
    # Ansible's own copy of the killed module is all that stays in TMPDIR.
    (payload,) = os.listdir(tmp_path / "node-tmp")
    assert payload.startswith("ansible_thinair.ovirt.disk_upload_payload_")
    shutil.rmtree(tmp_path / "node-tmp" / payload)
    lab_state.assert_nothing_left(disks={result["disk"]["id"]})


def modules_running(modules):
    """Processes running one of the collection's modules for this test
    (with its TMPDIR)."""
    tmpdir = f"TMPDIR={modules.tmpdir}".encode()
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"AnsiballZ_disk_" not in cmdline:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if tmpdir in environ:
            found.append(int(pid))
    return found


def test_timeout_bounds_the_copy(modules, lab, lab_state, tmp_path):
    """The copy gives up when the operation's timeout passes: the transfer is
    cancelled and the new disk removed."""
    image = make_full_raw(tmp_path / "slow.raw", 64 * MiB, 48 * MiB)
    # 768 requests of 64 KiB at 50 ms each on 4 connections: about 10 s.
    lab.hooks.slow_storage(50)
    (result,) = modules.run(
        modules.upload(
            image=image, storage_domain="nfs1", name="too-slow", buffer_size=65536, timeout=4
        )
    )
    failed(result, errors.message("disk_upload", "copy slower than the timeout"))
    lab_state.assert_nothing_left()
    (transfer,) = lab_state.new_transfers("upload")
    assert "cancelled_user" in lab.hooks.states(transfer.id)


def test_engine_unavailable_while_polling(modules, lab, lab_state, images, tmp_path):
    """The engine answers 503 to the next GETs of the transfer (a restart, a
    proxy in front of it): the module waits and asks again."""
    lab.hooks.fail("/ovirt-engine/api/imagetransfers/*", status=503, method="GET", count=3)
    dest = str(tmp_path / "polled.qcow2")
    up, down = modules.run(
        modules.upload(image=images["qcow2"], storage_domain="iscsi1"),
        modules.download(name="disk", dest=dest),
    )
    ok(up, True)
    ok(down, True)
    assert lab.hooks.faults() == []
    assert_same(images["raw"], dest)
    lab_state.assert_nothing_left(disks={up["disk"]["id"]})


@pytest.mark.parametrize("after", [False, True], ids=["refused", "answer lost"])
def test_engine_fails_finalize(modules, lab, lab_state, images, tmp_path, after):
    """The engine (or a proxy in front of it) answers 5xx to finalize: before
    carrying it out, and the module sends it again; or after, and the module
    reads the transfer's phase and does not send it twice. The upload
    completes."""
    lab.hooks.fail(
        "/ovirt-engine/api/imagetransfers/*/finalize", status=503 if not after else 502,
        method="POST", count=1 if after else 2, after=after,
    )  # fmt: skip
    dest = str(tmp_path / "finalized.qcow2")
    up, down = modules.run(
        modules.upload(image=images["qcow2"], storage_domain="nfs1", name="finalized"),
        modules.download(name="finalized", dest=dest),
    )
    ok(up, True)
    ok(down, True)
    assert lab.hooks.faults() == []
    assert_same(images["raw"], dest)
    (transfer,) = lab_state.new_transfers("upload")
    assert lab.hooks.states(transfer.id)[-1] == "finished_success"
    told = "the engine had done it, not sent again" if after else "sent again"
    assert [line for line in up["engine_retries"] if line.endswith(told)], up["engine_retries"]
    finalize = f"POST /ovirt-engine/api/imagetransfers/{transfer.id}/finalize"
    with open(os.path.join(lab.dir, "log", "engine.log")) as f:
        sent = [line for line in f if finalize in line]
    assert len(sent) == (1 if after else 3), sent
    lab_state.assert_nothing_left(disks={up["disk"]["id"]})


def test_block_volume_too_small_existing_disk(modules, lab, lab_state, tmp_path):
    """An existing sparse qcow2 disk on block storage whose volume (LV) is
    smaller than the data: the upload fails with the storage's error and the
    disk, which the user made, stays."""
    size = 160 * MiB
    image = make_full_raw(tmp_path / "big.raw", size, 150 * MiB)
    disk_id = create_disk(lab, "small-lv", size, "iscsi1", initial_size=MiB)
    volume = lab.hooks.volume(disk_id)
    assert volume["lv_size"] < 150 * MiB
    result = failed(
        modules.run_one(modules.upload(image=image, disk_id=disk_id)),
        "500 Internal Server Error",
    )
    assert (
        errors.message("disk_upload", "full block volume").replace("DISK_ID", disk_id)
        in result["msg"]
    )
    assert (
        f"imageio answers so when the volume is full: disk small-lv ({disk_id}) is a sparse "
        f"qcow2 disk on block storage domain iscsi1, whose volume has room for "
        f"{volume['lv_size']} bytes and does not grow during an upload, but the image needs up "
        "to "
    ) in result["msg"]
    assert "upload it to a new disk, which gets a volume of that size" in result["msg"]
    lab_state.assert_nothing_left(disks={disk_id})


def test_block_volume_too_small_new_disk(modules, lab, lab_state, tmp_path):
    """The source grows after the module measured it (an NBD export still
    being written), so the initial size it asked for is too small: the
    upload fails and the new disk is removed."""
    size = 160 * MiB
    path = tmp_path / "growing.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    sock = str(tmp_path / "growing.sock")
    cmd = ["qemu-nbd", "--persistent", "--shared=16", "--format=raw", f"--socket={sock}", str(path)]
    with running(cmd, sock) as server:
        url = f"nbd+unix:///?socket={sock}"
        # The disk is created a few seconds after the plan was made.
        lab.hooks.fail("/ovirt-engine/api/disks", method="POST", delay=3)
        join = run_in_background(
            modules, modules.upload(image=url, storage_domain="iscsi1", name="grown")
        )
        wait_for(lambda: lab.hooks.faults() == [], what="the disk to be requested")
        data = tmp_path / "data.raw"
        data.write_bytes(random.Random(4).randbytes(150 * MiB))
        subprocess.run(
            ["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={data}", f"of={url}", "bs=1M"],
            check=True,
        )
        (result,) = join()
        failed(result, "500 Internal Server Error")
        hint = "imageio answers so when the volume is full: the volume of disk grown on block"
        assert hint in result["msg"]
        assert "did the image change after it was measured?" in result["msg"]
        lab_state.keep_pids.add(server.pid)
        lab_state.assert_nothing_left()


# Bad input: a clear message, and nothing left behind.


@pytest.fixture
def corrupt_qcow2(images, tmp_path):
    path = tmp_path / "corrupt.qcow2"
    with open(images["qcow2"], "rb") as f:
        path.write_bytes(f.read(256 * 1024))
    return str(path)


# The changes to a good upload that make each case of errors.ERRORS.
BAD_UPLOADS = {
    "missing image": {"image": "TMP/missing.qcow2"},
    "a directory as the image": {"image": "TMP"},
    "corrupt qcow2": {"image": "CORRUPT"},
    "qcow2 whose backing file is missing": {"image": "TMP/no-backing.qcow2"},
    "unknown storage domain": {"storage_domain": "nfs9"},
    "no storage domain for a new disk": {"storage_domain": None},
    "raw sparse disk on a block domain": {"storage_domain": "iscsi1", "format": "raw"},
    "wrong password": {"auth": {"password": "not-the-password"}},
    "CA that did not sign the engine's certificate": {"auth": {"ca_file": "OTHER_CA"}},
    "missing CA file": {"auth": {"ca_file": "TMP/no-ca.pem"}},
    "unreachable engine": {"auth": {"url": "https://127.0.0.1:1/ovirt-engine/api"}},
    "unreachable NBD URL": {"image": "nbd://127.0.0.1:1/disk"},
    "wrong NBD export name": {"image": "nbd+unix:///wrong?socket=EXPORT_SOCKET"},
}


def test_bad_upload(modules, lab, lab_state, images, tmp_path, other_ca, corrupt_qcow2, export):
    """Each case in check mode and for real, in one playbook."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "gone.raw"),
         "-F", "raw", str(tmp_path / "no-backing.qcow2"), "64M"],
        check=True,
    )  # fmt: skip
    socket_path = export[1].split(":", 2)[2]
    # The export is the test's, not something an upload left.
    lab_state.keep_pids.update(e.pid for e in local_exports(tmp_path))

    def fill(value):
        if not isinstance(value, str):
            return value
        for key, real in (
            ("OTHER_CA", other_ca),
            ("CORRUPT", corrupt_qcow2),
            ("TMP", tmp_path),
            ("EXPORT_SOCKET", socket_path),
        ):
            value = value.replace(key, str(real))
        return value

    tasks = []
    cases = {}
    good = {"image": images["qcow2"], "storage_domain": "nfs1", "name": "bad-input"}
    for case, changes in BAD_UPLOADS.items():
        args = with_changes(good, changes, fill, modules.auth)
        tasks += [dict(modules.upload(**args), check_mode=True), modules.upload(**args)]
        cases[case] = (changes, errors.message("disk_upload", case))
    results = modules.run(*tasks)
    assert_cases_failed(cases, results, fill)
    lab_state.assert_nothing_left()


def test_image_larger_than_existing_disk(modules, lab, lab_state, images, tmp_path):
    disk_id = create_disk(lab, "too-small", 16 * MiB, "nfs1")
    before = lab.hooks.checksum(disk_id)
    failed(
        modules.run_one(modules.upload(image=images["qcow2"], name="too-small")),
        errors.message("disk_upload", "image larger than the existing disk").replace(
            "DISK_ID", disk_id
        ),
    )
    assert lab.hooks.checksum(disk_id) == before
    lab_state.assert_nothing_left(disks={disk_id})


def test_disk_locked_by_another_transfer(modules, lab, lab_state, images, tmp_path):
    """Another client's transfer holds the disk: the upload is refused, the
    other transfer goes on, and the disk keeps what it had."""
    disk_id = create_disk(lab, "held", IMAGE_SIZE, "nfs1")
    before = lab.hooks.checksum(disk_id)
    with contextlib.closing(lab.connection()) as con:
        transfers = con.system_service().image_transfers_service()
        other = transfers.add(
            types.ImageTransfer(
                disk=types.Disk(id=disk_id), direction=types.ImageTransferDirection.UPLOAD
            )
        )
        try:
            result = modules.run_one(
                modules.upload(image=images["qcow2"], disk_id=disk_id, force=True)
            )
            assert transfers.image_transfer_service(other.id).get().phase in (
                types.ImageTransferPhase.INITIALIZING,
                types.ImageTransferPhase.TRANSFERRING,
            )
        finally:
            transfers.image_transfer_service(other.id).finalize()
    failed(
        result,
        errors.message("disk_upload", "disk locked by another transfer").replace(
            "DISK_ID", disk_id
        ),
    )
    lab.hooks.settled()
    assert lab.hooks.checksum(disk_id) == before
    lab_state.assert_nothing_left(disks={disk_id})
