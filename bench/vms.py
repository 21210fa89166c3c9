# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The lab's VMs, measured: how long the engine's start takes to give a
running qemu (powering_up), the guest's boot to its ready line and to a
guest agent answer (up), and a live storage migration of a 4 GiB external
disk holding 1 GiB of data against `qemu-img convert` of the same chain to
the same storage domain, in one run."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MiB = 1024**2
GiB = 1024**3
MOVE_DISK_SIZE = 4 * GiB
MOVE_DATA_RUNS = 16  # of 64 MiB: 1 GiB


def vm_suite(workdir, rounds):
    sys.path.insert(0, ROOT)
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types

    from lab import guest
    from lab.lab import Hooks, Lab

    boot_image = os.path.join(workdir, "guest.raw")
    guest.build(boot_image)
    data_image = make_data_image(workdir)
    lab_dir = os.path.join(workdir, "vm-lab")
    shutil.rmtree(lab_dir, ignore_errors=True)
    lab = Lab(lab_dir)
    info = lab.start()
    hooks = Hooks(info["hooks_url"], info["ca_file"])
    con = sdk.Connection(
        url=info["engine_url"],
        username=info["username"],
        password=info["password"],
        ca_file=info["ca_file"],
    )
    system = con.system_service()
    sock = os.path.join(workdir, "data.sock")
    export = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "-f", "raw",
              "--socket", sock, data_image]  # fmt: skip
    server = subprocess.Popen(export)
    try:
        wait(lambda: os.path.exists(sock), 10)
        boot = upload(con, types, info, boot_image)
        vm = system.vms_service().add(
            types.Vm(
                name="bench-vm",
                cluster=types.Cluster(name="Default"),
                template=types.Template(name="Blank"),
                memory=256 * MiB,
            )
        )
        vm_service = system.vms_service().vm_service(vm.id)
        vm_service.disk_attachments_service().add(
            types.DiskAttachment(
                disk=types.Disk(id=boot.id),
                interface=types.DiskInterface.VIRTIO,
                bootable=True,
                active=True,
            )
        )
        starts = []
        for _round in range(rounds):
            starts.append(start_once(vm_service, hooks, types, guest, vm.id))
            vm_service.stop()
            wait(lambda: vm_service.get().status == types.VmStatus.DOWN, 30)

        vm_service.start()
        wait(lambda: vm_service.get().status == types.VmStatus.UP, 60)
        moves = [move_once(system, types, hooks, vm.id, sock, lab_dir, data_image)
                 for _round in range(rounds)]  # fmt: skip
        vm_service.stop()
        return {"starts": starts, "moves": moves}
    finally:
        con.close()
        server.terminate()
        server.wait()
        lab.stop()


def start_once(vm_service, hooks, types, guest, vm_id):
    start = time.monotonic()
    vm_service.start()
    wait(lambda: vm_service.get().status == types.VmStatus.POWERING_UP, 30, 0.02)
    running = time.monotonic() - start
    wait(lambda: guest.READY in hooks.console(vm_id), 60, 0.05)
    ready = time.monotonic() - start
    wait(lambda: vm_service.get().status == types.VmStatus.UP, 60, 0.05)
    up = time.monotonic() - start
    return {"running": running, "ready": ready, "up": up}


def move_once(system, types, hooks, vm_id, sock, lab_dir, data_image):
    """Hot-plug a new external disk reading the export, copy its chain with
    qemu-img convert, then move it live to nfs1; both times, in seconds."""
    data = system.disks_service().add(
        types.Disk(
            name=f"bench-external-{uuid.uuid4().hex[:8]}",
            format=types.DiskFormat.COW,
            provisioned_size=MOVE_DISK_SIZE,
            external_disk=f"nbd:unix:{sock}",
            storage_domains=[types.StorageDomain(name="scratch")],
        )
    )
    wait_ok(system, types, data.id)
    attachments = system.vms_service().vm_service(vm_id).disk_attachments_service()
    attachments.add(
        types.DiskAttachment(
            disk=types.Disk(id=data.id), interface=types.DiskInterface.VIRTIO_SCSI, active=True
        )
    )
    # The reference first: the same chain, read while the VM runs, into a
    # new qcow2 on the same domain, durable as the mirror's target is.
    chain = hooks.volume(data.id)["qemu_json"]
    target = os.path.join(lab_dir, "domains", "nfs1", "volumes", "bench-reference.qcow2")
    start = time.monotonic()
    subprocess.run(
        ["qemu-img", "convert", "-U", "-t", "none", "-O", "qcow2", chain, target], check=True
    )
    reference = time.monotonic() - start
    os.unlink(target)

    correlation_id = str(uuid.uuid4())
    start = time.monotonic()
    system.disks_service().disk_service(data.id).move(
        storage_domain=types.StorageDomain(name="nfs1"),
        query={"correlation_id": correlation_id},
    )
    jobs = system.jobs_service()
    wait(
        lambda: (
            (found := jobs.list(search=f"correlation_id={correlation_id}"))
            and found[0].status != types.JobStatus.STARTED
        ),
        600,
        0.05,
    )
    moved = time.monotonic() - start
    job = jobs.list(search=f"correlation_id={correlation_id}")[0]
    if job.status != types.JobStatus.FINISHED:
        raise RuntimeError(f"The live move failed: {job.description}")
    subprocess.run(
        ["qemu-img", "compare", "-U", data_image, hooks.volume(data.id)["qemu_json"]],
        check=True,
    )
    attachment = attachments.attachment_service(data.id)
    attachment.update(types.DiskAttachment(active=False))
    attachment.remove(detach_only=False)
    return {"move": moved, "reference": reference}


def print_vm_tables(result):
    print("| measure | best s | worst s |")
    print("|---|---:|---:|")
    for key, text in (
        ("running", "engine start → VM running (powering_up)"),
        ("ready", "engine start → guest ready line on the console"),
        ("up", "engine start → VM up (guest agent answered)"),
    ):
        values = [s[key] for s in result["starts"]]
        print(f"| {text} | {min(values):.2f} | {max(values):.2f} |")
    print()
    # Each round's move against the convert of the same round, best and
    # worst: the two share the machine's state of that moment.
    ratios = sorted(m["move"] / m["reference"] for m in result["moves"])
    best = min(result["moves"], key=lambda m: m["move"])
    print("| case | best live move s | best qemu-img convert s | time ratio best / worst |")
    print("|---|---:|---:|---:|")
    reference = min(m["reference"] for m in result["moves"])
    print(
        f"| 4 GiB external disk (1 GiB data) to nfs1, {len(ratios)} rounds | {best['move']:.2f} "
        f"| {reference:.2f} | {ratios[0]:.2f} / {ratios[-1]:.2f} |"
    )


def upload(con, types, info, image):
    from ovirt_imageio import client

    system = con.system_service()
    size = os.path.getsize(image)
    disk = system.disks_service().add(
        types.Disk(
            name="bench-boot",
            format=types.DiskFormat.COW,
            provisioned_size=size,
            storage_domains=[types.StorageDomain(name="nfs1")],
        )
    )
    wait_ok(system, types, disk.id)
    transfers = system.image_transfers_service()
    transfer = transfers.add(
        types.ImageTransfer(disk=types.Disk(id=disk.id), format=types.DiskFormat.RAW)
    )
    client.upload(image, transfer.transfer_url, info["ca_file"])
    transfers.image_transfer_service(transfer.id).finalize()
    wait_ok(system, types, disk.id)
    return disk


def wait_ok(system, types, disk_id):
    service = system.disks_service().disk_service(disk_id)
    wait(lambda: service.get().status == types.DiskStatus.OK, 60)


def wait(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s")
        time.sleep(interval)


def make_data_image(workdir):
    path = os.path.join(workdir, "data-4g.raw")
    if not os.path.exists(path):
        rnd = random.Random(7)
        slot = MOVE_DISK_SIZE // MOVE_DATA_RUNS
        with open(path + ".tmp", "wb") as f:
            f.truncate(MOVE_DISK_SIZE)
            for i in range(MOVE_DATA_RUNS):
                f.seek(i * slot + rnd.randrange(0, slot - 64 * MiB, MiB))
                f.write(os.urandom(64 * MiB))
        os.rename(path + ".tmp", path)
    return path
