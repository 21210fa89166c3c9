# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""External disks (``Disk.external_disk``) against the unmodified SDK: every
URL form of the API model, the probe, the stock switch, and the lab's guest
booting from a disk whose data lives on a read-only qemu-nbd export."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from lab import guest
from tests.helpers import running
from tests.lab.test_vms import add_vm, attach, sequence, vms, wait_disk_ok, wait_vm

MiB = 1024**2

pytestmark = pytest.mark.usefixtures("before")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_nbd(image, sock=None, port=None, export=""):
    """qemu-nbd exporting image read-only, as nbd_export does."""
    listen = ["--socket", sock] if sock else ["--bind", "127.0.0.1", "--port", str(port)]
    cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "-f", "raw",
           f"--export-name={export}", *listen, image]  # fmt: skip
    if sock:
        return running(cmd, sock)
    return _running_tcp(cmd, port)


@contextlib.contextmanager
def _running_tcp(cmd, port):
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"qemu-nbd did not listen on {port}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def add_external(con, url, size, domain="scratch", name=None):
    return (
        con.system_service()
        .disks_service()
        .add(
            types.Disk(
                name=name or f"ext-{uuid.uuid4().hex[:8]}",
                format=types.DiskFormat.COW,
                sparse=True,
                provisioned_size=size,
                external_disk=url,
                storage_domains=[types.StorageDomain(name=domain)],
            )
        )
    )


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def source(tmp_path, guest_image):
    path = str(tmp_path / "source.raw")
    shutil.copy(guest_image, path)
    return path


@pytest.mark.parametrize("form", ["unix", "unix-export", "tcp", "nbd-uri", "nbd-unix-uri"])
def test_url_forms(lab, con, tmp_path, source, form):
    sock = str(tmp_path / "nbd.sock")
    port = free_port()
    export = "vm disk" if form in ("unix-export", "nbd-uri") else ""
    url = {
        "unix": f"nbd:unix:{sock}",
        "unix-export": f"nbd:unix:{sock}:exportname={export}",
        "tcp": f"nbd:127.0.0.1:{port}",
        "nbd-uri": f"nbd://127.0.0.1:{port}/vm%20disk",
        "nbd-unix-uri": f"nbd+unix:///?socket={sock}",
    }[form]
    tcp = form in ("tcp", "nbd-uri")
    size = os.path.getsize(source)
    with qemu_nbd(source, sock=None if tcp else sock, port=port if tcp else None, export=export):
        disk = add_external(con, url, size)
        wait_disk_ok(con, disk.id)
        got = con.system_service().disks_service().disk_service(disk.id).get()
        assert got.external_disk == url
        # What the disk holds is the source, read through the NBD server.
        volume = lab.hooks.volume(disk.id)
        subprocess.run(["qemu-img", "compare", source, volume["qemu_json"]], check=True)
        con.system_service().disks_service().disk_service(disk.id).remove()


def test_local_path(lab, con, source):
    disk = add_external(con, source, os.path.getsize(source))
    wait_disk_ok(con, disk.id)
    volume = lab.hooks.volume(disk.id)
    subprocess.run(["qemu-img", "compare", source, volume["qemu_json"]], check=True)
    con.system_service().disks_service().disk_service(disk.id).remove()


@pytest.mark.parametrize(
    "url, domain, words",
    [
        ("nbd:unix:/nonexistent/nbd.sock", "scratch", "Cannot read the external disk"),
        ("nbd:127.0.0.1:1", "scratch", "Cannot read the external disk"),
        ("/nonexistent/disk.img", "scratch", "does not exist"),
        ("http://example.invalid/disk.img", "scratch", "not a URL the lab supports"),
        ("nbd:127.0.0.1:1", "iscsi1", "needs a file storage domain"),
    ],
)
def test_unreadable_external_disk(lab, con, before, url, domain, words):
    with pytest.raises(sdk.Error) as e:
        add_external(con, url, 64 * MiB, domain=domain)
    assert e.value.code == 400
    assert words in str(e.value)
    assert {d["id"] for d in lab.hooks.state()["disks"]} == {d["id"] for d in before["disks"]}


def test_stock_engine_ignores_external_disk(lab, con, tmp_path, source):
    sock = str(tmp_path / "nbd.sock")
    lab.hooks.stock(True)
    try:
        with qemu_nbd(source, sock=sock):
            disk = add_external(con, f"nbd:unix:{sock}", os.path.getsize(source))
        assert disk.external_disk is None
        wait_disk_ok(con, disk.id)
        got = con.system_service().disks_service().disk_service(disk.id).get()
        assert got.external_disk is None
        # An ordinary empty disk.
        volume = lab.hooks.volume(disk.id)
        info = subprocess.run(
            ["qemu-img", "map", "--output", "json", volume["qemu_json"]],
            capture_output=True,
            text=True,
            check=True,
        )
        assert '"data": true' not in info.stdout
        con.system_service().disks_service().disk_service(disk.id).remove()
    finally:
        lab.hooks.stock(False)


def test_guest_boots_from_external_disk(lab, con, tmp_path, source):
    sock = str(tmp_path / "nbd.sock")
    before = digest(source)
    with qemu_nbd(source, sock=sock):
        disk = add_external(con, f"nbd:unix:{sock}", os.path.getsize(source), name="ext-boot")
        wait_disk_ok(con, disk.id)
        vm = add_vm(con)
        attach(con, vm.id, disk.id, bootable=True, active=True)
        service = vms(con).vm_service(vm.id)
        service.start()
        wait_vm(con, vm.id, types.VmStatus.UP, timeout=45)
        lab.hooks.wait_console(vm.id, guest.READY)
        time.sleep(1)
        service.shutdown()
        wait_vm(con, vm.id, types.VmStatus.DOWN, timeout=30)
        # The guest's writes are in the volume on the temporary domain; the
        # sequence has no gap and its file system is clean.
        numbers = sequence(lab, disk.id)
        # At least the second the guest ran after its ready line.
        assert len(numbers) >= guest.WRITES_PER_SECOND
        assert numbers == list(range(1, len(numbers) + 1))
        service.remove()
    assert digest(source) == before
    assert lab.hooks.state()["vm_processes"] == []


def test_read_error_pauses_the_vm(lab, con, tmp_path, source):
    # With its NBD server gone, the guest's firmware cannot read the disk
    # after a reset: qemu stops the VM (rerror=stop) and the engine says paused.
    sock = str(tmp_path / "nbd.sock")
    with qemu_nbd(source, sock=sock) as server:
        disk = add_external(con, f"nbd:unix:{sock}", os.path.getsize(source))
        wait_disk_ok(con, disk.id)
        vm = add_vm(con)
        attach(con, vm.id, disk.id, bootable=True, active=True)
        service = vms(con).vm_service(vm.id)
        service.start()
        wait_vm(con, vm.id, types.VmStatus.UP, timeout=45)
        server.kill()
        server.wait()
        service.reboot()
        wait_vm(con, vm.id, types.VmStatus.PAUSED, timeout=30)
        # start resumes a paused VM; the read fails again and it pauses again.
        service.start()
        wait_vm(con, vm.id, types.VmStatus.PAUSED, timeout=30)
        assert "up" in lab.hooks.states(vm.id)[-3:]
        service.stop()
        service.remove()
    assert lab.hooks.state()["vm_processes"] == []
