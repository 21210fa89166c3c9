# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Moving disks between storage domains against the unmodified SDK and
ovirt-img: cold moves of floating disks, live storage migration of running
VMs' disks (external ones included) with guest writes before, during and
after the mirror, and every failure path leaving the VM on its old chain."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid

import ovirtsdk4 as sdk
import pytest
from ovirt_imageio import client
from ovirtsdk4 import types

from lab import guest
from tests.helpers import running, wait_for
from tests.lab.test_external import add_external, digest, qemu_nbd
from tests.lab.test_ovirt_img import ovirt_img
from tests.lab.test_vms import (
    add_vm,
    add_vm_disk,
    attach,
    sequence,
    upload,
    vms,
    wait_disk_ok,
    wait_vm,
)

MiB = 1024**2
DATA_SIZE = 512 * MiB

pytestmark = pytest.mark.usefixtures("before")


# Helpers.


def vm_state(lab, vm_id):
    return next(v for v in lab.hooks.state()["vms"] if v["id"] == vm_id)


def disks(con):
    return con.system_service().disks_service()


def move(con, disk_id, domain):
    """Move a disk with a correlation id, as the SDK's examples follow jobs;
    the correlation id."""
    correlation_id = str(uuid.uuid4())
    disks(con).disk_service(disk_id).move(
        storage_domain=types.StorageDomain(name=domain), query={"correlation_id": correlation_id}
    )
    return correlation_id


def wait_job(con, correlation_id, timeout=120):
    jobs = con.system_service().jobs_service()

    def done():
        found = jobs.list(search=f"correlation_id={correlation_id}")
        if found and all(j.status != types.JobStatus.STARTED for j in found):
            return found[0]
        return None

    return wait_for(done, timeout, f"job {correlation_id}")


def domain_of(con, disk_id):
    disk = disks(con).disk_service(disk_id).get()
    return con.follow_link(disk.storage_domains[0]).name


def volumes(lab, image_id):
    """Names of the domains holding a volume of this id."""
    return sorted(
        name
        for name in ("nfs1", "iscsi1", "scratch")
        if os.path.exists(os.path.join(lab.dir, "domains", name, "volumes", image_id + ".meta"))
    )


def make_data_image(path, size=DATA_SIZE):
    """A raw image with data in a few places, zeros elsewhere."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, str(size)], check=True)
    commands = []
    for i, offset in enumerate(range(0, size, 64 * MiB)):
        commands += ["-c", f"write -P {0x10 + i} {offset} {16 * MiB}"]
    subprocess.run(["qemu-io", "-f", "raw", *commands, path], check=True, stdout=subprocess.DEVNULL)
    return path


class GuestWriter:
    """Writes through a running VM's device, as its guest would, recording
    every write so the expected image can be rebuilt."""

    def __init__(self, lab, vm_id, disk_id):
        self.lab = lab
        self.vm_id = vm_id
        self.disk_id = disk_id
        self.writes = []
        self._stop = threading.Event()
        self._thread = None

    def write(self, offset, length, pattern):
        self.lab.hooks.guest_write(self.vm_id, self.disk_id, offset, length, pattern)
        self.writes.append((offset, length, pattern))

    def start(self, first_offset):
        def run():
            offset = first_offset
            while not self._stop.is_set():
                self.write(offset, MiB, 0x40 + len(self.writes) % 64)
                offset = (offset + 5 * MiB) % DATA_SIZE
                time.sleep(0.05)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def expected(self, source, path):
        shutil.copy(source, path)
        commands = []
        for offset, length, pattern in self.writes:
            commands += ["-c", f"write -P {pattern} {offset} {length}"]
        subprocess.run(
            ["qemu-io", "-f", "raw", *commands, path], check=True, stdout=subprocess.DEVNULL
        )
        return path


# Cold moves.


def test_cold_move_floating_disk(lab, con, tmp_path):
    image = make_data_image(str(tmp_path / "data.raw"), 64 * MiB)
    disk = upload(lab, con, image, "nfs1", "move-cold")
    correlation_id = move(con, disk.id, "iscsi1")
    job = wait_job(con, correlation_id)
    assert job.status == types.JobStatus.FINISHED
    assert job.description == "Moving Disk move-cold from nfs1 to iscsi1"
    steps = con.follow_link(job.steps)
    assert [s.description for s in steps] == ["Cloning image's structure", "Copying image data"]
    assert all(s.status == types.StepStatus.FINISHED for s in steps)
    wait_disk_ok(con, disk.id)
    assert domain_of(con, disk.id) == "iscsi1"
    volume = lab.hooks.volume(disk.id)
    assert volume["domain"] == "iscsi1"
    subprocess.run(["qemu-img", "compare", image, volume["qemu_json"]], check=True)
    assert volumes(lab, volume["id"]) == ["iscsi1"]

    wait_job(con, move(con, disk.id, "nfs1"))
    wait_disk_ok(con, disk.id)
    volume = lab.hooks.volume(disk.id)
    subprocess.run(["qemu-img", "compare", image, volume["qemu_json"]], check=True)
    assert volumes(lab, volume["id"]) == ["nfs1"]
    disks(con).disk_service(disk.id).remove()


def test_move_refused(lab, con, tmp_path):
    image = make_data_image(str(tmp_path / "data.raw"), 64 * MiB)
    disk = upload(lab, con, image, "nfs1", "move-refused")
    service = disks(con).disk_service(disk.id)
    with pytest.raises(sdk.Error) as e:
        service.move(storage_domain=types.StorageDomain(name="nfs1"))
    assert e.value.code == 400
    assert "The source and target storage domains are the same" in str(e.value)
    with pytest.raises(sdk.Error) as e:
        service.move(storage_domain=types.StorageDomain(name="nowhere"))
    assert e.value.code == 404
    with pytest.raises(sdk.Error) as e:
        service.move()
    assert e.value.code == 400
    correlation_id = move(con, disk.id, "iscsi1")
    with pytest.raises(sdk.Error) as e:
        service.move(storage_domain=types.StorageDomain(name="scratch"))
    assert e.value.code == 409
    assert "is being moved or copied" in str(e.value)
    wait_job(con, correlation_id)
    wait_disk_ok(con, disk.id)
    service.remove()


# Live storage migration.


@pytest.fixture
def source(tmp_path, guest_image):
    path = str(tmp_path / "source.raw")
    shutil.copy(guest_image, path)
    return path


@pytest.mark.parametrize("target", ["nfs1", "iscsi1"])
def test_live_move_of_external_disks(lab, con, tmp_path, source, target):
    """The guest boots from an external disk and writes its sequence file;
    a second external disk gets guest writes before, during and after the
    mirror. After the pivot the NBD servers stop and the VM runs on."""
    data = make_data_image(str(tmp_path / "data.raw"))
    boot_sock, data_sock = str(tmp_path / "boot.sock"), str(tmp_path / "data.sock")
    sources = {source: digest(source), data: digest(data)}
    with (
        qemu_nbd(source, sock=boot_sock) as boot_server,
        qemu_nbd(data, sock=data_sock) as data_server,
    ):
        boot = add_external(con, f"nbd:unix:{boot_sock}", os.path.getsize(source))
        data_disk = add_external(con, f"nbd:unix:{data_sock}", DATA_SIZE)
        wait_disk_ok(con, boot.id)
        wait_disk_ok(con, data_disk.id)
        vm = add_vm(con)
        service = vms(con).vm_service(vm.id)
        attach(con, vm.id, boot.id, bootable=True, active=True)
        attach(con, vm.id, data_disk.id, types.DiskInterface.VIRTIO_SCSI, active=True)
        service.start()
        wait_vm(con, vm.id, types.VmStatus.UP, timeout=45)
        lab.hooks.wait_console(vm.id, guest.READY)

        urls = sorted([f"nbd:unix:{boot_sock}", f"nbd:unix:{data_sock}"])
        assert vm_state(lab, vm.id)["reads"] == urls
        writer = GuestWriter(lab, vm.id, data_disk.id)
        writer.write(3 * MiB, 2 * MiB, 0x21)
        writer.start(7 * MiB)
        # The mirrors wait 2 s before the pivot, writes going to both sides.
        lab.hooks.fail("/copy", method="MOVE", delay=2, count=2)
        boot_move = move(con, boot.id, target)
        data_move = move(con, data_disk.id, target)
        time.sleep(0.5)
        assert disks(con).disk_service(data_disk.id).get().status == types.DiskStatus.LOCKED
        assert len(vm_state(lab, vm.id)["block_jobs"]) == 2
        boot_job, data_job = wait_job(con, boot_move), wait_job(con, data_move)
        writer.stop()
        assert boot_job.status == data_job.status == types.JobStatus.FINISHED
        assert data_job.description.startswith("Migrating Disk ")
        assert data_job.description.endswith(f" to {target} of VM {vm.name}")
        steps = [s.description for s in con.follow_link(data_job.steps)]
        assert "Synchronizing image data" in steps
        assert len(writer.writes) > 2

        boot_server.terminate()
        data_server.terminate()
    # No NBD server any more: the VM goes on, from the target domain.
    writer.write(DATA_SIZE - 2 * MiB, MiB, 0x7E)
    time.sleep(1)
    assert service.get().status == types.VmStatus.UP
    for disk_id in (boot.id, data_disk.id):
        wait_disk_ok(con, disk_id)
        assert domain_of(con, disk_id) == target
        assert volumes(lab, lab.hooks.volume(disk_id)["id"]) == [target]
    state = vm_state(lab, vm.id)
    assert state["reads"] == [] and state["block_jobs"] == []
    # What the VM sees is the source plus every write.
    expected = writer.expected(data, str(tmp_path / "expected.raw"))
    assert lab.hooks.vm_checksum(vm.id, data_disk.id) == client.checksum(expected)

    service.shutdown()
    wait_vm(con, vm.id, types.VmStatus.DOWN, timeout=30)
    numbers = sequence(lab, boot.id)
    assert len(numbers) >= 10
    assert numbers == list(range(1, len(numbers) + 1))

    downloaded = str(tmp_path / "downloaded.raw")
    proc = ovirt_img(lab, tmp_path, "download-disk", "--format", "raw", data_disk.id, downloaded)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["qemu-img", "compare", expected, downloaded], check=True)
    assert {path: digest(path) for path in sources} == sources
    service.remove()


def up_vm_with_external(lab, con, source, url, size):
    """A VM booted (up) from an uploaded copy of the guest, with an external
    disk reading url as its second disk; (vm, boot disk, external disk)."""
    disk = add_external(con, url, size)
    wait_disk_ok(con, disk.id)
    boot = upload(lab, con, source, "nfs1", f"boot-{uuid.uuid4().hex[:8]}")
    vm = add_vm(con)
    attach(con, vm.id, boot.id, bootable=True, active=True)
    attach(con, vm.id, disk.id, types.DiskInterface.VIRTIO_SCSI, active=True)
    vms(con).vm_service(vm.id).start()
    wait_vm(con, vm.id, types.VmStatus.UP, timeout=45)
    return vm, boot, disk


def assert_failed_on_scratch(lab, con, correlation_id, disk_id):
    """The move's job failed and the disk is ok on scratch, its only volume."""
    job = wait_job(con, correlation_id)
    assert job.status == types.JobStatus.FAILED
    wait_disk_ok(con, disk_id)
    assert domain_of(con, disk_id) == "scratch"
    assert volumes(lab, lab.hooks.volume(disk_id)["id"]) == ["scratch"]


@contextlib.contextmanager
def slow_export(image, sock, delay_ms):
    """image read-only through nbdkit's delay filter in front of qemu-nbd."""
    inner = sock + ".inner"
    with qemu_nbd(image, sock=inner):
        cmd = ["nbdkit", "--foreground", "--readonly", "--unix", sock, "--filter=delay",
               "nbd", f"socket={inner}", f"delay-read={delay_ms}ms"]  # fmt: skip
        with running(cmd, sock) as server:
            yield server


@pytest.mark.parametrize("failure", ["fault", "nbd-server-gone", "vm-stopped"])
def test_live_move_failure_keeps_the_vm_on_its_chain(lab, con, tmp_path, source, failure):
    data = make_data_image(str(tmp_path / "data.raw"))
    sock = str(tmp_path / "data.sock")
    # A slow source keeps the mirror copying when the failure comes.
    with slow_export(data, sock, 2000) as server:
        vm, _boot, disk = up_vm_with_external(lab, con, source, f"nbd:unix:{sock}", DATA_SIZE)
        service = vms(con).vm_service(vm.id)
        lab.hooks.guest_write(vm.id, disk.id, MiB, MiB, 0x61)
        if failure == "fault":
            lab.hooks.fail("/copy", method="MOVE", status=500)
        correlation_id = move(con, disk.id, "iscsi1")
        time.sleep(0.5)
        if failure == "nbd-server-gone":
            server.kill()
        elif failure == "vm-stopped":
            service.stop()
        assert_failed_on_scratch(lab, con, correlation_id, disk.id)
        if failure != "vm-stopped":
            assert service.get().status == types.VmStatus.UP
            # The VM still writes to its old chain.
            lab.hooks.guest_write(vm.id, disk.id, 9 * MiB, MiB, 0x62)
            service.stop()
    service.remove()
    assert lab.hooks.state()["vm_processes"] == []


def test_live_moves_failing_again_and_again(lab, con, tmp_path, source):
    """Mirrors cancelled while they copy, round after round, with the guest
    writing: the VM runs on and sees every write."""
    data = make_data_image(str(tmp_path / "data.raw"))
    sock = str(tmp_path / "data.sock")
    with qemu_nbd(data, sock=sock):
        vm, boot, disk = up_vm_with_external(lab, con, source, f"nbd:unix:{sock}", DATA_SIZE)
        service = vms(con).vm_service(vm.id)
        writer = GuestWriter(lab, vm.id, disk.id)
        writer.start(3 * MiB)
        try:
            for _round in range(40):
                lab.hooks.fail("/copy", method="MOVE", status=500, count=2)
                moves = [move(con, boot.id, "iscsi1"), move(con, disk.id, "iscsi1")]
                assert [wait_job(con, m).status for m in moves] == [types.JobStatus.FAILED] * 2
                assert service.get().status == types.VmStatus.UP
        finally:
            writer.stop()
        assert domain_of(con, boot.id) == "nfs1" and domain_of(con, disk.id) == "scratch"
        expected = writer.expected(data, str(tmp_path / "expected.raw"))
        assert lab.hooks.vm_checksum(vm.id, disk.id) == client.checksum(expected)
        service.stop()
    service.remove()


def test_live_move_needs_an_up_vm(lab, con):
    # Without a guest agent the VM stays powering_up: oVirt refuses LSM then.
    vm = add_vm(con)
    service = vms(con).vm_service(vm.id)
    disk = add_vm_disk(con, vm.id)
    service.start()
    wait_vm(con, vm.id, types.VmStatus.POWERING_UP, timeout=10)
    with pytest.raises(sdk.Error) as e:
        disks(con).disk_service(disk.id).move(storage_domain=types.StorageDomain(name="iscsi1"))
    assert e.value.code == 409
    assert "should be either in Up or Paused status" in str(e.value)
    service.stop()
    service.remove()


def test_live_move_to_a_full_domain_fails_cleanly(lab, con, tmp_path, source):
    # A live move's target on block storage is allocated for the whole disk:
    # a sparse 200 GiB disk does not fit in iscsi1 (100 GiB).
    image = str(tmp_path / "huge.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, str(200 * 1024**3)], check=True)
    sock = str(tmp_path / "huge.sock")
    with qemu_nbd(image, sock=sock):
        vm, boot, disk = up_vm_with_external(lab, con, source, f"nbd:unix:{sock}", 200 * 1024**3)
        service = vms(con).vm_service(vm.id)
        assert_failed_on_scratch(lab, con, move(con, disk.id, "iscsi1"), disk.id)
        assert service.get().status == types.VmStatus.UP
        service.stop()
        service.remove()
    assert not [d for d in lab.hooks.state()["disks"] if d["id"] in (disk.id, boot.id)]
