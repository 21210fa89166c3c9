# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""VMs of the lab against the unmodified SDK: the Blank template, VMs and
their disk attachments, and real qemu processes running the lab's guest,
which boots from an uploaded disk, answers as a guest agent and writes its
sequence file until an ACPI shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import ovirtsdk4 as sdk
import pytest
from ovirt_imageio import client
from ovirtsdk4 import types

from lab import guest
from lab.host.process import start_time
from tests.helpers import SHUTDOWN_TIMEOUT, wait_for

MiB = 1024**2
GiB = 1024**3
BLANK = "00000000-0000-0000-0000-000000000000"
Status = types.VmStatus

pytestmark = pytest.mark.usefixtures("before")


# Helpers.


def vms(con):
    return con.system_service().vms_service()


def add_vm(con, name=None, memory=256 * MiB, **kwargs):
    return vms(con).add(
        types.Vm(
            name=name or f"vm-{uuid.uuid4().hex[:8]}",
            cluster=types.Cluster(name="Default"),
            template=types.Template(name="Blank"),
            memory=memory,
            **kwargs,
        )
    )


def wait_vm(con, vm_id, *statuses, timeout=60.0):
    service = vms(con).vm_service(vm_id)
    return wait_for(
        lambda: (vm := service.get()).status in statuses and vm,
        timeout,
        f"VM {vm_id} in {statuses}",
    )


def wait_disk_ok(con, disk_id, timeout=30.0):
    service = con.system_service().disks_service().disk_service(disk_id)
    return wait_for(
        lambda: service.get().status == types.DiskStatus.OK, timeout, f"disk {disk_id} ok"
    )


def upload(lab, con, image, domain, name):
    """A new disk holding image (raw), uploaded through imageio."""
    size = os.path.getsize(image)
    disk = (
        con.system_service()
        .disks_service()
        .add(
            types.Disk(
                name=name,
                format=types.DiskFormat.COW,
                provisioned_size=size,
                initial_size=2 * size,
                storage_domains=[types.StorageDomain(name=domain)],
            )
        )
    )
    wait_disk_ok(con, disk.id)
    transfers = con.system_service().image_transfers_service()
    transfer = transfers.add(
        types.ImageTransfer(disk=types.Disk(id=disk.id), format=types.DiskFormat.RAW)
    )
    client.upload(image, transfer.transfer_url, lab.ca_file)
    transfers.image_transfer_service(transfer.id).finalize()
    wait_for(
        lambda: (
            transfers.image_transfer_service(transfer.id).get().phase
            == types.ImageTransferPhase.FINISHED_SUCCESS
        ),
        30,
        "upload finished",
    )
    wait_disk_ok(con, disk.id)
    return disk


def attach(con, vm_id, disk_id, interface=types.DiskInterface.VIRTIO, **kwargs):
    return (
        vms(con)
        .vm_service(vm_id)
        .disk_attachments_service()
        .add(types.DiskAttachment(disk=types.Disk(id=disk_id), interface=interface, **kwargs))
    )


def sequence(lab, disk_id):
    """The guest's sequence numbers, read from the volume without mounting."""
    volume = lab.hooks.volume(disk_id)
    raw = volume["path"]
    if volume["format"] != "raw":
        raw = volume["path"] + ".inspect.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", volume["format"], "-O", "raw", volume["path"], raw],
            check=True,
        )
    try:
        partition = f"{raw}?offset={guest.PARTITION_START}"
        check = subprocess.run(
            ["e2fsck", "-fn", partition], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        out = subprocess.run(
            ["debugfs", "-R", f"cat {guest.SEQUENCE_FILE}", partition],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        if raw != volume["path"]:
            os.unlink(raw)
    return [int(line) for line in out.split()]


def assert_no_vm_process(lab):
    state = lab.hooks.state()
    assert state["vm_processes"] == []
    out = subprocess.run(
        ["pgrep", "-f", f"qemu-system.*{lab.dir}"], capture_output=True, check=False
    )
    assert out.stdout == b""


# The Blank template.


def test_blank_template(con):
    templates = con.system_service().templates_service()
    found = templates.list(search="name=Blank and datacenter=Default")
    assert [t.id for t in found] == [BLANK]
    blank = templates.template_service(BLANK).get()
    assert blank.name == "Blank"
    assert blank.memory == GiB
    assert blank.version.version_number == 1
    assert blank.os.type == "other"


# VMs.


def test_vm_create_defaults_search_update_remove(lab, con):
    vm = vms(con).add(
        types.Vm(
            name="lab-defaults",
            cluster=types.Cluster(name="Default"),
            template=types.Template(name="Blank"),
        )
    )
    assert vm.status == Status.DOWN
    assert vm.memory == GiB
    assert vm.memory_policy.guaranteed == GiB
    assert vm.memory_policy.max == 4 * GiB
    assert (vm.cpu.topology.sockets, vm.cpu.topology.cores, vm.cpu.topology.threads) == (1, 1, 1)
    assert con.follow_link(vm.template).id == BLANK
    assert con.follow_link(vm.cluster).name == "Default"

    assert [v.id for v in vms(con).list(search="name=lab-defaults")] == [vm.id]
    assert [v.id for v in vms(con).list(search="name=lab-def*")] == [vm.id]
    assert vms(con).list(search="name=nothing-like-this") == []
    other = add_vm(con, name="lab-defaults-2")
    assert len(vms(con).list(search="name=lab-defaults*", max=1)) == 1

    service = vms(con).vm_service(vm.id)
    updated = service.update(
        types.Vm(
            description="edited",
            memory=512 * MiB,
            memory_policy=types.MemoryPolicy(guaranteed=512 * MiB, max=2 * GiB),
            cpu=types.Cpu(topology=types.CpuTopology(sockets=1, cores=2, threads=1)),
        )
    )
    assert updated.description == "edited"
    assert updated.memory == 512 * MiB
    assert updated.cpu.topology.cores == 2
    jobs = con.system_service().jobs_service().list(search="description=Editing*")
    assert any(j.description == "Editing VM lab-defaults properties" for j in jobs)

    service.remove()
    vms(con).vm_service(other.id).remove()
    with pytest.raises(sdk.NotFoundError):
        service.get()


@pytest.mark.parametrize(
    "vm, status, words",
    [
        (types.Vm(name="x", template=types.Template(name="Blank")), 400, "[cluster.id|name]"),
        (
            types.Vm(cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")),
            400,
            "[name]",
        ),
        (
            types.Vm(
                name="x",
                cluster=types.Cluster(name="Nowhere"),
                template=types.Template(name="Blank"),
            ),
            404,
            "Entity not found: Cluster: name=Nowhere",
        ),
        (
            types.Vm(
                name="x",
                cluster=types.Cluster(name="Default"),
                template=types.Template(name="NoSuchTemplate"),
            ),
            404,
            "Entity not found: GetVmTemplate",
        ),
        (
            types.Vm(
                name="bad name!",
                cluster=types.Cluster(name="Default"),
                template=types.Template(name="Blank"),
            ),
            400,
            "contains special characters",
        ),
    ],
)
def test_vm_create_refused(lab, con, vm, status, words):
    with pytest.raises(sdk.Error) as e:
        vms(con).add(vm)
    assert e.value.code == status
    assert words in str(e.value)


def test_vm_duplicate_name(lab, con):
    vm = add_vm(con, name="lab-twice")
    try:
        with pytest.raises(sdk.Error) as e:
            add_vm(con, name="lab-twice")
        assert e.value.code == 409
        assert "The VM name is already in use" in str(e.value)
    finally:
        vms(con).vm_service(vm.id).remove()


# Disk attachments.


def test_disk_attachments(lab, con):
    vm = add_vm(con)
    attachments = vms(con).vm_service(vm.id).disk_attachments_service()
    # Created inline, as the SDK's add_vm_disk.py does.
    inline = attachments.add(
        types.DiskAttachment(
            disk=types.Disk(
                name="lab-inline",
                format=types.DiskFormat.COW,
                provisioned_size=64 * MiB,
                storage_domains=[types.StorageDomain(name="nfs1")],
            ),
            interface=types.DiskInterface.VIRTIO,
            bootable=True,
            active=True,
        )
    )
    assert inline.active and inline.bootable
    assert inline.interface == types.DiskInterface.VIRTIO
    wait_disk_ok(con, inline.disk.id)
    assert con.follow_link(inline.disk).name == "lab-inline"
    found = con.system_service().disks_service().list(search=f'vm_names="{vm.name}"')
    assert [d.id for d in found] == [inline.disk.id]

    floating = (
        con.system_service()
        .disks_service()
        .add(
            types.Disk(
                name="lab-floating",
                format=types.DiskFormat.COW,
                provisioned_size=64 * MiB,
                storage_domains=[types.StorageDomain(name="iscsi1")],
            )
        )
    )
    # A locked disk cannot be attached.
    with pytest.raises(sdk.Error) as e:
        attach(con, vm.id, floating.id)
    assert e.value.code == 409
    assert "The following disks are locked: lab-floating" in str(e.value)
    wait_disk_ok(con, floating.id)

    # A second bootable disk is refused; an existing disk is attached inactive.
    with pytest.raises(sdk.Error) as e:
        attach(con, vm.id, floating.id, types.DiskInterface.VIRTIO_SCSI, bootable=True)
    assert e.value.code == 409
    assert "is already marked as boot" in str(e.value)
    second = attach(con, vm.id, floating.id, types.DiskInterface.VIRTIO_SCSI)
    assert second.id == floating.id
    assert not second.active and not second.bootable
    with pytest.raises(sdk.Error) as e:
        attach(con, vm.id, floating.id)
    assert e.value.code == 409
    assert "already attached" in str(e.value)
    assert {a.id for a in attachments.list()} == {inline.id, floating.id}

    updated = attachments.attachment_service(floating.id).update(types.DiskAttachment(active=True))
    assert updated.active

    # Detaching keeps the disk; removing the VM removes the disks it still has.
    attachments.attachment_service(floating.id).remove()
    assert con.system_service().disks_service().disk_service(floating.id).get()
    vms(con).vm_service(vm.id).remove()
    disks = con.system_service().disks_service()
    with pytest.raises(sdk.NotFoundError):
        disks.disk_service(inline.disk.id).get()
    disks.disk_service(floating.id).remove()


# Running VMs.


def test_vm_runs_the_guest(lab, con, guest_image):
    boot = upload(lab, con, guest_image, "nfs1", "lab-guest-boot")
    data = (
        con.system_service()
        .disks_service()
        .add(
            types.Disk(
                name="lab-guest-data",
                format=types.DiskFormat.COW,
                provisioned_size=64 * MiB,
                storage_domains=[types.StorageDomain(name="iscsi1")],
            )
        )
    )
    wait_disk_ok(con, data.id)
    vm = add_vm(con, name="lab-guest")
    service = vms(con).vm_service(vm.id)
    attach(con, vm.id, boot.id, bootable=True, active=True)

    started = time.monotonic()
    service.start()
    assert service.get().status in (Status.WAIT_FOR_LAUNCH, Status.POWERING_UP)
    running = wait_vm(con, vm.id, Status.POWERING_UP, Status.UP, timeout=10)
    assert time.monotonic() - started < 5
    assert running.host is not None and running.start_time is not None
    # Up once the guest agent answers, well before vdsm's 60 s.
    wait_vm(con, vm.id, Status.UP, timeout=45)
    console = lab.hooks.wait_console(vm.id, guest.READY)
    assert "root=/dev/vda1" in console

    with pytest.raises(sdk.Error) as e:
        service.start()
    assert e.value.code == 409
    assert "Cannot run VM because the VM is in Up status" in str(e.value)
    with pytest.raises(sdk.Error) as e:
        service.remove()
    assert e.value.code == 409
    assert "Cannot remove VM. VM is running." in str(e.value)
    with pytest.raises(sdk.Error) as e:
        con.system_service().disks_service().disk_service(boot.id).remove()
    assert e.value.code == 409

    # Hot-plug a disk, write through it as the guest would, unplug it.
    attach(con, vm.id, data.id, types.DiskInterface.VIRTIO_SCSI, active=True)
    lab.hooks.guest_write(vm.id, data.id, MiB, 4 * MiB, 0x5A)
    attachment = service.disk_attachments_service().attachment_service(data.id)
    attachment.update(types.DiskAttachment(active=False))
    assert not attachment.get().active
    attachment.remove()
    expected = str(lab.dir) + "/expected.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", expected, str(64 * MiB)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x5A {MiB} {4 * MiB}", expected],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    volume = lab.hooks.volume(data.id)
    subprocess.run(["qemu-img", "compare", expected, volume["qemu_json"]], check=True)
    os.unlink(expected)

    # A reset reboots the guest, which goes on with its sequence.
    service.reboot()
    wait_for(
        lambda: lab.hooks.console(vm.id).count(guest.READY) == 2, 45, "the guest's second boot"
    )
    # Live storage migration of an ordinary disk, from file to block storage.
    correlation_id = str(uuid.uuid4())
    con.system_service().disks_service().disk_service(boot.id).move(
        storage_domain=types.StorageDomain(name="iscsi1"), query={"correlation_id": correlation_id}
    )
    jobs = con.system_service().jobs_service()
    job = wait_for(
        lambda: (
            (found := jobs.list(search=f"correlation_id={correlation_id}"))
            and found[0].status != types.JobStatus.STARTED
            and found[0]
        ),
        60,
        "the move",
    )
    assert job.status == types.JobStatus.FINISHED
    wait_disk_ok(con, boot.id)
    assert lab.hooks.volume(boot.id)["domain"] == "iscsi1"
    assert service.get().status == Status.UP

    time.sleep(1)
    service.shutdown()
    assert service.get().status == Status.POWERING_DOWN
    wait_vm(con, vm.id, Status.DOWN, timeout=30)
    # qemu exits once the guest powered off: never seen paused on the way.
    assert lab.hooks.states(vm.id)[-2:] == ["powering_down", "down"]
    assert guest.POWERING_OFF in lab.hooks.console(vm.id)
    assert_no_vm_process(lab)
    numbers = sequence(lab, boot.id)
    # At least the second the guest ran after its ready line.
    assert len(numbers) >= guest.WRITES_PER_SECOND
    assert numbers == list(range(1, len(numbers) + 1))

    # Stopping a VM that is down is skipped, and succeeds, as on oVirt.
    service.stop()
    service.remove()
    disks = con.system_service().disks_service()
    with pytest.raises(sdk.NotFoundError):
        disks.disk_service(boot.id).get()
    disks.disk_service(data.id).remove()


def test_vm_stop_and_crash(lab, con, guest_image):
    boot = upload(lab, con, guest_image, "iscsi1", "lab-guest-stop")
    vm = add_vm(con)
    service = vms(con).vm_service(vm.id)
    attach(con, vm.id, boot.id, types.DiskInterface.SATA, bootable=True, active=True)
    service.start()
    wait_vm(con, vm.id, Status.POWERING_UP, Status.UP, timeout=10)
    service.stop()
    assert service.get().status == Status.DOWN
    assert_no_vm_process(lab)

    # A VM whose qemu dies is seen down.
    service.start()
    wait_vm(con, vm.id, Status.POWERING_UP, Status.UP, timeout=10)
    pid = next(v["pid"] for v in lab.hooks.state()["vms"] if v["id"] == vm.id)
    os.kill(pid, 9)
    wait_vm(con, vm.id, Status.DOWN, timeout=10)
    assert_no_vm_process(lab)
    service.remove()


def test_vm_without_guest_stays_powering_up_and_ignores_acpi(lab, con):
    # An empty disk boots nothing, so no guest agent answers: like vdsm, the
    # lab reports powering_up until GUEST_WAIT_TIMEOUT (60 s) has passed.
    vm = add_vm(con)
    service = vms(con).vm_service(vm.id)
    add_vm_disk(con, vm.id)
    service.start()
    wait_vm(con, vm.id, Status.POWERING_UP, timeout=10)
    time.sleep(3)
    assert service.get().status == Status.POWERING_UP

    # Nothing takes the ACPI button either: as on oVirt, the VM shows
    # powering_down until the shutdown times out, then runs on as before.
    pid = next(v["pid"] for v in lab.hooks.state()["vms"] if v["id"] == vm.id)
    asked = time.monotonic()
    service.shutdown()
    assert service.get().status == Status.POWERING_DOWN
    wait_vm(con, vm.id, Status.POWERING_UP, timeout=SHUTDOWN_TIMEOUT + 10)
    assert time.monotonic() - asked >= SHUTDOWN_TIMEOUT - 1
    assert next(v["pid"] for v in lab.hooks.state()["vms"] if v["id"] == vm.id) == pid
    service.stop()
    service.remove()


def test_stopping_the_lab_stops_its_vms(tmp_path, guest_image):
    from lab.lab import Hooks, Lab

    lab = Lab(str(tmp_path / "lab"))
    info = lab.start()
    try:
        hooks = Hooks(info["hooks_url"], info["ca_file"])
        con = connect(info)
        try:
            vm = add_vm(con)
            disk = add_vm_disk(con, vm.id)
            vms(con).vm_service(vm.id).start()
            wait_vm(con, vm.id, Status.POWERING_UP, timeout=10)
            pid = hooks.state()["vms"][0]["pid"]
            assert start_time(pid) is not None
        finally:
            con.close()
    finally:
        lab.stop()
    assert start_time(pid) is None
    # Started again, the lab finds the VM down and its disk in place.
    info = lab.start()
    try:
        con = connect(info)
        try:
            assert vms(con).vm_service(vm.id).get().status == Status.DOWN
            assert con.system_service().disks_service().disk_service(disk.id).get()
        finally:
            con.close()
    finally:
        lab.stop()


def connect(info):
    return sdk.Connection(
        url=info["engine_url"],
        username=info["username"],
        password=info["password"],
        ca_file=info["ca_file"],
    )


def add_vm_disk(con, vm_id):
    attachment = (
        vms(con)
        .vm_service(vm_id)
        .disk_attachments_service()
        .add(
            types.DiskAttachment(
                disk=types.Disk(
                    name=f"disk-{uuid.uuid4().hex[:8]}",
                    format=types.DiskFormat.COW,
                    provisioned_size=64 * MiB,
                    storage_domains=[types.StorageDomain(name="nfs1")],
                ),
                interface=types.DiskInterface.VIRTIO,
                bootable=True,
            )
        )
    )
    wait_disk_ok(con, attachment.disk.id)
    return attachment.disk


def test_a_restarted_lab_takes_over_its_running_vms(tmp_path, guest_image):
    from lab.lab import Hooks, Lab

    lab = Lab(str(tmp_path / "lab"))
    info = lab.start()
    try:
        con = connect(info)
        try:
            boot = upload(SimpleNamespace(ca_file=info["ca_file"]), con, guest_image,
                          "nfs1", "adopted-boot")  # fmt: skip
            vm = add_vm(con)
            attach(con, vm.id, boot.id, bootable=True, active=True)
            vms(con).vm_service(vm.id).start()
            wait_vm(con, vm.id, Status.UP, timeout=45)
        finally:
            con.close()
        pid = Hooks(info["hooks_url"], info["ca_file"]).state()["vms"][0]["pid"]
        # The lab process dies; its VM runs on, as VMs outlive an engine.
        os.kill(info["pid"], 9)
        wait_for(lambda: not lab.status()["running"], 10, "the lab process to end")
        assert start_time(pid) is not None
        info = lab.start()
        hooks = Hooks(info["hooks_url"], info["ca_file"])
        assert hooks.state()["vms"][0]["pid"] == pid
        con = connect(info)
        try:
            service = vms(con).vm_service(vm.id)
            assert service.get().status == Status.UP
            hooks.guest_write(vm.id, boot.id, 32 * MiB, 65536, 0x3C)
            service.shutdown()
            wait_vm(con, vm.id, Status.DOWN, timeout=30)
        finally:
            con.close()
    finally:
        lab.stop()
    assert start_time(pid) is None


def test_guest_image_command(tmp_path):
    path = str(tmp_path / "guest.qcow2")
    command = [sys.executable, "-m", "lab", "guest-image", path, "--format", "qcow2"]
    proc = subprocess.run(
        [*command, "--size", str(64 * MiB)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"format": "qcow2", "path": path, "size": 64 * MiB}
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output", "json", path], capture_output=True, check=True
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", 64 * MiB)
    raw = str(tmp_path / "guest.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
    with open(raw, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa" and mbr[446] == 0x80 and mbr[450] == 0x83
    check = subprocess.run(
        ["e2fsck", "-fn", f"{raw}?offset={guest.PARTITION_START}"], capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout

    proc = subprocess.run([*command, "--size", "1024"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "the guest needs at least" in proc.stderr
