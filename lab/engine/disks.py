# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Floating disks: AddDisk, UpdateDisk, RemoveDisk and their validation.

A new disk answers 201 with status ``locked`` at once; its volume is created
in the background and the disk turns ``ok`` (or disappears, as a failed
AddDisk rolls back). Validation follows AddDiskCommand's order and messages:
the domain, the format/allocation/backup combination (ImagesHandler
``checkImageConfiguration``), free space, the block disk size limit, then a
duplicate id.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid

from lab.engine import errors, external, search, xml
from lab.storage import StorageError

log = logging.getLogger("engine.disks")

OK = "ok"
LOCKED = "locked"
ILLEGAL = "illegal"

FORMATS = ("cow", "raw")
BACKUPS = ("none", "incremental")
QCOW_VERSIONS = ("qcow2_v2", "qcow2_v3")
CONTENT_TYPES = (
    "data",
    "ovf_store",
    "memory_dump_volume",
    "memory_metadata_volume",
    "iso",
    "hosted_engine",
    "hosted_engine_sanlock",
    "hosted_engine_metadata",
    "hosted_engine_configuration",
    "backup_scratch",
)

# StorageDomainValidator.getTotalSizeForNewDisks: what a new disk needs free.
EMPTY_QCOW_HEADER_SIZE = 1024**2
INITIAL_BLOCK_ALLOCATION_SIZE = 1024**3
# MaxBlockDiskSizeInGibiBytes.
MAX_BLOCK_DISK_GIB = 8192

VOLUME_FORMATS = {"cow": "qcow2", "raw": "raw"}


class Disks:
    def __init__(self, engine):
        self.engine = engine
        self.db = engine.db
        self._workers: list[threading.Thread] = []
        self._workers_lock = threading.Lock()

    # REST operations.

    def add(self, node: xml.Node, correlation_id: str | None) -> dict:
        request = self._parse_new(node)
        inventory = self.engine.inventory
        backing = None
        if request["external_disk"] is not None:
            backing = external.probe(request["external_disk"], request["sd"])
        with self.db.transaction():
            self._validate_new(request)
            disk_id = request["id"] or str(uuid.uuid4())
            disk = {
                "id": disk_id,
                "alias": request["alias"] or f"disk-{disk_id[:8]}",
                "description": request["description"],
                "format": request["format"],
                "sparse": int(request["sparse"]),
                "provisioned_size": request["provisioned_size"],
                "initial_size": request["initial_size"],
                "content_type": request["content_type"],
                "backup": request["backup"],
                "qcow_version": request["qcow_version"] if request["format"] == "cow" else None,
                "shareable": int(request["shareable"]),
                "wipe_after_delete": int(request["wipe_after_delete"]),
                "storage_domain_id": request["sd"]["id"],
                "image_id": request["image_id"] or str(uuid.uuid4()),
                "status": LOCKED,
                "created": time.time(),
                "external_disk": request["external_disk"],
            }
            self.db.insert("disks", disk)
            self.db.record("disk", disk_id, LOCKED)
            job_id = self.engine.jobs.start(f"Adding Disk {disk['alias']}", correlation_id)
        domain = inventory.domain(disk["storage_domain_id"])
        log.info("Adding disk %s (%s) on %s", disk["alias"], disk_id, domain.name)
        self._background(self._create_volume, disk, job_id, backing)
        return disk

    def get(self, disk_id: str) -> dict:
        disk = self.db.get("disks", disk_id)
        if disk is None:
            raise errors.not_found()
        return disk

    def list(
        self,
        query: str | None,
        case_sensitive: bool,
        limit: int | None,
        sd_id: str | None = None,
    ) -> list[dict]:
        if sd_id is None:
            disks = self.db.all("SELECT * FROM disks ORDER BY created")
        else:
            disks = self.db.all(
                "SELECT * FROM disks WHERE storage_domain_id = ? ORDER BY created", (sd_id,)
            )
        return search.select(disks, query, self._fields(), "disks", case_sensitive, limit)

    def update(self, disk_id: str, node: xml.Node, correlation_id: str | None) -> dict:
        new_size = node.integer("provisioned_size")
        alias = node.text("alias") or node.text("name")
        description = node.text("description")
        with self.db.transaction():
            disk = self.get(disk_id)
            if disk["status"] == LOCKED:
                raise errors.disks_locked(errors.ACTION_EDIT, disk["alias"])
            extend = new_size is not None and new_size != disk["provisioned_size"]
            if extend and new_size < disk["provisioned_size"]:
                raise errors.disk_size_too_small()
            changes = {}
            if alias:
                changes["alias"] = alias
            if description is not None:
                changes["description"] = description
            job_id = self.engine.jobs.start(
                f"Updating Disk {changes.get('alias', disk['alias'])} properties", correlation_id
            )
            if extend:
                changes["status"] = LOCKED
                self.db.record("disk", disk_id, LOCKED)
            if changes:
                self.db.update("disks", disk_id, **changes)
            disk = self.get(disk_id)
        if extend:
            self._background(self._extend_volume, disk, new_size, job_id)
        else:
            self.engine.jobs.end(job_id, succeeded=True)
        return disk

    def remove(self, disk_id: str, correlation_id: str | None) -> str:
        with self.db.transaction():
            disk = self.get(disk_id)
            if disk["status"] == LOCKED:
                raise errors.object_locked(errors.ACTION_REMOVE)
            if self.engine.vms.plugged(disk_id) is not None:
                raise errors.disk_attached_to_running_vm(errors.ACTION_REMOVE, disk["alias"])
            job_id = self.engine.jobs.start(f"Removing Disk {disk['alias']}", correlation_id)
            self.set_status(disk_id, LOCKED)
        try:
            self.destroy(disk)
        except StorageError:
            log.exception("Removing disk %s failed", disk_id)
            self.set_status(disk_id, ILLEGAL)
            self.engine.jobs.end(job_id, succeeded=False)
            raise
        self.engine.jobs.end(job_id, succeeded=True)
        return job_id

    def snapshots(self, disk_id: str | None, sd_id: str | None, include_active: bool) -> list[dict]:
        """Disk snapshots: a lab disk has one volume, its active layer, listed only on request."""
        if not include_active:
            return []
        if disk_id is not None:
            return [self.get(disk_id)]
        return self.db.all(
            "SELECT * FROM disks WHERE storage_domain_id = ? ORDER BY created", (sd_id,)
        )

    def by_image(self, image_id: str) -> dict | None:
        return self.db.one("SELECT * FROM disks WHERE image_id = ?", (image_id,))

    # XML.

    def render(self, disk: dict):
        return xml.disk(self._visible(disk), self.sizes(disk))

    def render_snapshot(self, disk: dict, parent: str):
        return xml.disk_snapshot(self._visible(disk), self.sizes(disk), parent)

    def sizes(self, disk: dict) -> dict:
        volume = self.volume(disk)
        if volume is None:
            return {"actual_size": 0, "total_size": 0}
        try:
            size = volume.actual_size()
        except OSError:
            size = 0
        return {"actual_size": size, "total_size": size}

    # Used by transfers and start-up.

    def volume(self, disk: dict):
        domain = self.engine.inventory.domain(disk["storage_domain_id"])
        try:
            return domain.volume(disk["image_id"])
        except StorageError:
            return None

    def set_status(self, disk_id: str, status: str) -> None:
        with self.db.transaction():
            changed = self.db.run(
                "UPDATE disks SET status = ? WHERE id = ? AND status != ?",
                (status, disk_id, status),
            )
            if changed:
                self.db.record("disk", disk_id, status)

    def refresh(self, disk_id: str) -> None:
        """Complete the disk from its volume, as the engine does after creating
        or uploading one: the size vdsm reports (a raw volume on block storage
        spans its whole LV) and the qcow2 compatibility level."""
        disk = self.get(disk_id)
        volume = self.volume(disk)
        if volume is None:
            return
        changes = {"provisioned_size": volume.capacity}
        if disk["format"] == "cow":
            changes["qcow_version"] = _qcow_version(volume)
        self.db.update("disks", disk_id, **changes)

    def destroy(self, disk: dict) -> None:
        """Remove the volume and the disk; the disk is gone even if it had no volume."""
        domain = self.engine.inventory.domain(disk["storage_domain_id"])
        if self.volume(disk) is not None:
            domain.remove_volume(disk["image_id"])
        with self.db.transaction():
            self.db.delete("disks", disk["id"])
            self.db.run("DELETE FROM disk_attachments WHERE disk_id = ?", (disk["id"],))
            self.db.record("disk", disk["id"], "removed")
        log.info("Removed disk %s (%s)", disk["alias"], disk["id"])

    def recover(self, transferring: set[str]) -> None:
        """At start-up, finish what a stopped engine left: a disk locked by a
        creation or an extension that never ended."""
        for disk in self.db.all("SELECT * FROM disks WHERE status = ?", (LOCKED,)):
            if disk["id"] in transferring:
                continue
            volume = self.volume(disk)
            if volume is None:
                log.warning("Disk %s has no volume after restart: rolling back", disk["id"])
                self.destroy(disk)
            else:
                self.set_status(disk["id"], OK)

    def wait(self) -> None:
        """Wait for background volume work, at shutdown."""
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join()

    # Private helpers.

    def _visible(self, disk: dict) -> dict:
        # A stock engine never returns external_disk.
        return dict(disk, external_disk=None) if self.engine.stock else disk

    def _background(self, target, *args):
        def run():
            try:
                target(*args)
            finally:
                with self._workers_lock:
                    self._workers.remove(threading.current_thread())

        worker = threading.Thread(target=run, name=f"disk-{target.__name__}", daemon=True)
        with self._workers_lock:
            self._workers.append(worker)
        worker.start()

    def _create_volume(self, disk: dict, job_id: str, backing=None) -> None:
        # AddDisk runs as a host task; the disk stays visibly locked meanwhile.
        time.sleep(self.engine.settings.disk_create_delay)
        domain = self.engine.inventory.domain(disk["storage_domain_id"])
        initial_size = None
        if domain.kind == "block" and disk["sparse"] and disk["format"] == "cow":
            # The engine passes initial_size only for sparse disks on block storage.
            initial_size = disk["initial_size"] or None
        try:
            domain.create_volume(
                disk["image_id"],
                VOLUME_FORMATS[disk["format"]],
                disk["provisioned_size"],
                bool(disk["sparse"]),
                initial_size,
                backing=backing,
                backing_file=external.backing_file(*backing) if backing else None,
            )
        except StorageError as e:
            log.error("Creating the volume of disk %s failed: %s", disk["id"], e)
            with self.db.transaction():
                self.db.delete("disks", disk["id"])
                self.db.record("disk", disk["id"], "removed")
            self.engine.jobs.end(job_id, succeeded=False)
            return
        with self.db.transaction():
            self.refresh(disk["id"])
            self.set_status(disk["id"], OK)
        self.engine.jobs.end(job_id, succeeded=True)
        log.info("Disk %s (%s) is ok", disk["alias"], disk["id"])

    def _extend_volume(self, disk: dict, new_size: int, job_id: str) -> None:
        volume = self.volume(disk)
        try:
            if volume is None:
                raise StorageError(f"Disk {disk['id']} has no volume")
            volume.extend(new_size)
        except StorageError as e:
            log.error("Extending disk %s failed: %s", disk["id"], e)
            self.set_status(disk["id"], OK)
            self.engine.jobs.end(job_id, succeeded=False)
            return
        with self.db.transaction():
            self.refresh(disk["id"])
            self.set_status(disk["id"], OK)
        self.engine.jobs.end(job_id, succeeded=True)

    def _parse_new(self, node: xml.Node) -> dict:
        missing = [
            name
            for name, tag in (("provisionedSize", "provisioned_size"), ("format", "format"))
            if not node.text(tag)
        ]
        if missing:
            raise errors.incomplete("Disk", missing, "add")
        domains = node.children("storage_domains/storage_domain")
        sd = None
        if domains:
            first = domains[0]
            if first.id:
                sd = self.db.get("storage_domains", first.id)
                if sd is None:
                    raise errors.storage_domain_not_exist()
            elif first.text("name"):
                name = first.text("name")
                sd = self.engine.inventory.storage_domain_by_name(name)
                if sd is None:
                    raise errors.entity_not_found(name)
        disk_id = node.id
        if disk_id is not None:
            _check_uuid(disk_id, "disk id")
        image_id = node.text("image_id")
        if image_id is not None:
            _check_uuid(image_id, "image id")
        sparse = node.boolean("sparse")
        external_disk = node.text("external_disk") or None
        if self.engine.stock:
            # Released engines neither read nor return the field.
            external_disk = None
        return {
            "external_disk": external_disk,
            "id": disk_id,
            "image_id": image_id,
            "alias": node.text("alias") or node.text("name"),
            "description": node.text("description"),
            "provisioned_size": node.integer("provisioned_size"),
            "initial_size": node.integer("initial_size"),
            "format": node.enum("format", FORMATS, "DiskFormat"),
            "sparse": True if sparse is None else sparse,
            "backup": node.enum("backup", BACKUPS, "DiskBackup") or "none",
            "content_type": node.enum("content_type", CONTENT_TYPES, "DiskContentType") or "data",
            "qcow_version": node.enum("qcow_version", QCOW_VERSIONS, "QcowVersion") or "qcow2_v3",
            "shareable": bool(node.boolean("shareable")),
            "wipe_after_delete": bool(node.boolean("wipe_after_delete")),
            "sd": sd,
        }

    def _validate_new(self, request: dict) -> None:
        sd = request["sd"]
        if sd is None:
            raise errors.storage_domain_not_specified()
        if request["provisioned_size"] <= 0:
            raise errors.validation(
                errors.BAD_REQUEST,
                f"Cannot {errors.ACTION_ADD} {errors.TYPE_DISK}. Disk's provisioned size has "
                "to be greater than 0.",
            )
        fmt, sparse, backup = request["format"], request["sparse"], request["backup"]
        block = sd["kind"] == "block"
        if (
            (not sparse and fmt == "cow" and backup != "incremental")
            or (fmt == "raw" and backup == "incremental")
            or (block and sparse and fmt == "raw")
        ):
            raise errors.disk_configuration_not_supported(fmt, sparse, backup)
        available = self.engine.inventory.domain(sd["id"]).stats()["available"]
        if available < _space_needed(request, block):
            raise errors.disk_space_low(sd["name"])
        if block and request["provisioned_size"] > MAX_BLOCK_DISK_GIB * 1024**3:
            raise errors.disk_max_size_exceeded(MAX_BLOCK_DISK_GIB)
        if request["id"] is not None:
            existing = self.db.get("disks", request["id"])
            if existing is not None:
                raise errors.disk_already_exists(request["id"], existing["alias"])
        if request["image_id"] is not None and self.by_image(request["image_id"]) is not None:
            raise errors.validation(
                errors.CONFLICT,
                f"Cannot {errors.ACTION_ADD} {errors.TYPE_DISK}. One of the Template Images "
                "already exists.",
            )

    def _fields(self) -> dict:
        def domain_names(disk):
            sd = self.db.get("storage_domains", disk["storage_domain_id"])
            return [sd["name"]] if sd else []

        def vm_names(disk):
            rows = self.db.all(
                "SELECT v.name FROM disk_attachments a JOIN vms v ON a.vm_id = v.id "
                "WHERE a.disk_id = ?",
                (disk["id"],),
            )
            return [r["name"] for r in rows]

        return {
            "id": search.Field(lambda d: d["id"]),
            "name": search.Field(lambda d: d["alias"]),
            "alias": search.Field(lambda d: d["alias"]),
            "description": search.Field(lambda d: d["description"]),
            "status": search.Field(lambda d: d["status"], enum=True),
            "format": search.Field(lambda d: d["format"], enum=True),
            "content_type": search.Field(lambda d: d["content_type"], enum=True),
            "provisioned_size": search.Field(lambda d: d["provisioned_size"]),
            "image_id": search.Field(lambda d: d["image_id"]),
            "shareable": search.Field(lambda d: bool(d["shareable"])),
            "storage": search.Field(domain_names),
            "storage.name": search.Field(domain_names),
            "storage.id": search.Field(lambda d: d["storage_domain_id"]),
            "vm_names": search.Field(vm_names),
        }


def _space_needed(request: dict, block: bool) -> int:
    if request["format"] == "cow":
        if not request["sparse"]:
            return request["provisioned_size"]
        return INITIAL_BLOCK_ALLOCATION_SIZE if block else EMPTY_QCOW_HEADER_SIZE
    return EMPTY_QCOW_HEADER_SIZE if request["sparse"] else request["provisioned_size"]


def _qcow_version(volume) -> str:
    """qcow2_v2 or qcow2_v3, from the compat level qemu-img reports."""
    info = subprocess.run(
        # -U: a running VM may hold the volume.
        ["qemu-img", "info", "-U", "--output", "json", volume.qemu_json(readonly=True)],
        capture_output=True,
        text=True,
        check=False,
    )
    if info.returncode != 0:
        raise StorageError(f"qemu-img info of volume {volume.id} failed: {info.stderr.strip()}")
    compat = json.loads(info.stdout).get("format-specific", {}).get("data", {}).get("compat")
    return "qcow2_v2" if compat == "0.10" else "qcow2_v3"


def _check_uuid(value: str, what: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise errors.bad_request(f"Invalid {what} '{value}': expected a UUID") from None
