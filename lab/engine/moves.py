# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Moving a disk to another storage domain: MoveDisk, which runs
MoveOrCopyDisk (cold) or LiveMigrateDisk (live), as OVIRT-FACTS §7 describes.

- A floating disk, or one whose VM is down or that is unplugged: a cold copy
  of the whole chain with ``qemu-img convert`` to a new volume on the target
  domain, then the source volume is removed.
- A disk plugged into a running VM (``up`` or ``paused`` only): live storage
  migration. The VM mirrors the disk's whole chain (an external disk's
  backing included) into a new volume on the target with QMP
  ``blockdev-mirror``; when the mirror is ready the disk is recorded on the
  target and the VM pivots to it (``job-complete``); the source volume goes.
  The engine's auto-generated snapshot and its merge show as steps of the
  job: the lab mirrors the chain in one job instead of snapshot, mirror of
  the active layer and sync of the rest, with the same result.

The disk is ``locked`` until the job ends. Any failure before the pivot (the
NBD server of an external disk gone, the target full, the VM stopping, an
injected fault) ends the job ``failed``, removes the target volume and leaves
the disk ``ok`` on its source, the VM running on its old chain.

Faults: a lab fault with method ``MOVE`` and path ``/copy`` or ``/pivot``
(``POST /lab/faults``) fails the next move at that stage.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
import time
import uuid

from lab.engine import errors, xml
from lab.host import HostError
from lab.storage import StorageError

log = logging.getLogger("engine.moves")

VOLUME_FORMATS = {"cow": "qcow2", "raw": "raw"}
# How often a running mirror is looked at.
POLL_INTERVAL = 0.05
AUTO_SNAPSHOT = "Auto-generated for Live Storage Migration"
PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class MoveFailed(Exception):
    """The move cannot go on; the message says why."""


class Moves:
    def __init__(self, engine):
        self.engine = engine
        self.db = engine.db

    def move(self, disk_id: str, node: xml.Node, correlation_id: str | None) -> str:
        target_node = node.child("storage_domain")
        if target_node is None or not (target_node.id or target_node.text("name")):
            raise errors.incomplete("Action", ["storageDomain.id|name"], "move")
        disks = self.engine.disks
        with self.db.transaction():
            disk = disks.get(disk_id)
            target = self._target(target_node)
            source = self.db.get("storage_domains", disk["storage_domain_id"])
            if disk["status"] == "locked":
                raise _refused(f"Disk {disk['alias']} is being moved or copied.", errors.CONFLICT)
            if target["id"] == source["id"]:
                raise _refused(
                    "The source and target storage domains are the same.", errors.BAD_REQUEST
                )
            if target["kind"] == "block" and disk["format"] == "raw" and disk["sparse"]:
                raise errors.disk_configuration_not_supported("raw", True, disk["backup"])
            vm = self.engine.vms.plugged(disk_id)
            if vm is not None and vm["status"] not in ("up", "paused"):
                raise _refused(
                    "The Virtual Machine should be either in Up or Paused status.",
                    errors.CONFLICT,
                )
            if vm is None:
                description = (
                    f"Moving Disk {disk['alias']} from {source['name']} to {target['name']}"
                )
            else:
                description = (
                    f"Migrating Disk {disk['alias']} from {source['name']} to {target['name']} "
                    f"of VM {vm['name']}"
                )
            job_id = self.engine.jobs.start(description, correlation_id)
            disks.set_status(disk_id, "locked")
        work = self._live if vm is not None else self._cold
        threading.Thread(
            target=self._run,
            args=(work, disk, source, target, vm, job_id),
            name=f"move-{disk_id[:8]}",
            daemon=True,
        ).start()
        log.info("%s (job %s)", description, job_id)
        return job_id

    # Private helpers.

    def _run(self, work, disk, source, target, vm, job_id) -> None:
        jobs = self.engine.jobs
        created = False
        try:
            step = jobs.add_step(job_id, "Cloning image's structure")
            volume = self._create_target(disk, target, live=vm is not None)
            created = True
            jobs.end_step(step, succeeded=True)
            work(disk, source, target, vm, job_id, volume)
        except Exception as e:
            if isinstance(e, (MoveFailed, HostError, StorageError)):
                log.error("Moving disk %s failed: %s", disk["id"], e)
            else:
                log.exception("Moving disk %s failed", disk["id"])
            if created:
                self._remove_volume(target, disk["image_id"])
            self.engine.disks.set_status(disk["id"], "ok")
            jobs.end(job_id, succeeded=False)
            return
        self._remove_volume(source, disk["image_id"])
        with self.db.transaction():
            self.engine.disks.refresh(disk["id"])
            self.engine.disks.set_status(disk["id"], "ok")
        jobs.end(job_id, succeeded=True)
        log.info("Moved disk %s to %s", disk["alias"], target["name"])

    def _cold(self, disk, source, target, vm, job_id, volume) -> None:
        jobs = self.engine.jobs
        step = jobs.add_step(job_id, "Copying image data")
        source_volume = self.engine.inventory.domain(source["id"]).volume(disk["image_id"])
        self._fault("/copy")
        command = [
            "qemu-img", "convert", "-p", "-n", "-t", "none", "-T", "none",
            "-O", volume.format, source_volume.qemu_json(readonly=True), volume.qemu_json(),
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        output = b""
        while chunk := proc.stdout.read1(4096):
            output = (output + chunk)[-256:]
            found = PROGRESS.findall(output)
            if found:
                jobs.step_progress(step, int(float(found[-1])))
        errors_text = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() != 0:
            raise MoveFailed(f"qemu-img convert failed: {errors_text}")
        self._switch(disk, target)
        jobs.end_step(step, succeeded=True)

    def _live(self, disk, source, target, vm, job_id, volume) -> None:
        jobs = self.engine.jobs
        running = self.engine.host.vm(vm["id"])
        if running is None:
            raise MoveFailed(f"VM {vm['name']} is not running")
        step = jobs.add_step(job_id, f"Creating snapshot: {AUTO_SNAPSHOT}")
        jobs.end_step(step, succeeded=True)
        step = jobs.add_step(job_id, "Synchronizing image data")
        node_name = "m" + uuid.uuid4().hex[:30]
        # Opened as the VM's disks are: through the page cache, a mirror of
        # 1 GiB is two to three times slower.
        node = dict(volume.qemu_node(direct=True), discard="unmap")
        mirror = running.mirror(disk["id"], node, node_name)
        try:
            self._fault("/copy")
            self._wait_ready(running, mirror, step)
            jobs.end_step(step, succeeded=True)
            step = jobs.add_step(job_id, "Pivoting to the target volume")
            self._fault("/pivot")
            # The engine records the disk on the target before the pivot.
            self._switch(disk, target)
            try:
                running.pivot(disk["id"], mirror, node, node_name)
            except BaseException:
                self._switch(disk, source)
                raise
        except BaseException:
            if running.alive():
                running.cancel_mirror(mirror, node_name)
            raise
        jobs.end_step(step, succeeded=True)
        step = jobs.add_step(job_id, f"Removing snapshot: {AUTO_SNAPSHOT}")
        jobs.end_step(step, succeeded=True)

    def _wait_ready(self, running, mirror, step) -> None:
        while True:
            if not running.alive():
                raise MoveFailed("The VM stopped during the migration")
            job = running.block_job(mirror)
            if job is None:
                raise MoveFailed("The mirror job disappeared")
            if job.get("error"):
                raise MoveFailed(f"The mirror failed: {job['error']}")
            if job["status"] in ("concluded", "aborting", "null"):
                raise MoveFailed(f"The mirror ended without being ready ({job['status']})")
            total = job.get("total-progress") or 0
            if total:
                self.engine.jobs.step_progress(step, job["current-progress"] * 100 // total)
            if job["status"] == "ready":
                return
            time.sleep(POLL_INTERVAL)

    def _create_target(self, disk, target, live):
        domain = self.engine.inventory.domain(target["id"])
        source = self.engine.disks.volume(disk)
        if source is None:
            raise MoveFailed(f"Disk {disk['alias']} has no volume")
        fmt = VOLUME_FORMATS[disk["format"]]
        initial_size = None
        if target["kind"] == "block" and fmt == "qcow2" and disk["sparse"]:
            # A block volume does not grow in the lab: a running guest may
            # write anywhere meanwhile, so a live move takes the whole size.
            initial_size = _required_size(source, "fully-allocated" if live else "required")
        return domain.create_volume(
            disk["image_id"], fmt, source.capacity, bool(disk["sparse"]), initial_size
        )

    def _switch(self, disk, domain) -> None:
        with self.db.transaction():
            self.db.update("disks", disk["id"], storage_domain_id=domain["id"])

    def _remove_volume(self, domain, image_id) -> None:
        try:
            self.engine.inventory.domain(domain["id"]).remove_volume(image_id)
        except StorageError as e:
            log.warning("Cannot remove volume %s from %s: %s", image_id, domain["name"], e)

    def _target(self, node: xml.Node) -> dict:
        if node.id:
            sd = self.db.get("storage_domains", node.id)
            if sd is None:
                raise errors.storage_domain_not_exist(errors.ACTION_MOVE)
            return sd
        sd = self.engine.inventory.storage_domain_by_name(node.text("name"))
        if sd is None:
            raise errors.entity_not_found(node.text("name"))
        return sd

    def _fault(self, stage: str) -> None:
        fault = self.engine.faults.take("MOVE", stage)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                raise MoveFailed(fault.detail)


def _required_size(volume, key) -> int:
    """What the whole chain needs as a standalone qcow2 (qemu-img measure's
    "required" or "fully-allocated"); -U: a running VM may hold it."""
    proc = subprocess.run(
        ["qemu-img", "measure", "-U", "--output", "json", "-O", "qcow2", volume.qemu_json(True)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise MoveFailed(f"qemu-img measure failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)[key]


def _refused(message: str, status: int) -> errors.ApiError:
    return errors.validation(status, f"Cannot {errors.ACTION_MOVE} {errors.TYPE_DISK}. {message}")
