# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Image transfers: TransferDiskImageCommand and its callback, in the lab.

The POST does all the setup, as the engine does for an existing disk: lock
the disk, start qemu-nbd (``format=raw``) or point the ticket at the volume
file (``cow`` or no format), add the host ticket (the host adds the proxy's),
then answer in phase ``transferring``.

A monitor thread then visits every open transfer, like the engine's command
callback. The engine polls a running transfer about every 10 s
(AsyncCommandPollingRateInSeconds); the lab polls every second by default so
tests and demos do not wait, and each visit handles one phase, as the
engine's state handlers do::

    transferring --finalize--> finalizing_success --verify ok--> finished_success
                                                  --verify bad-> finalizing_failure
    finalizing_failure --> (disk illegal, upload disk removed) --> finished_failure
    --cancel--> cancelled_user --> finalizing_cleanup --> finished_cleanup --> finished_failure
    cancelled_system --> finalizing_failure
    transferring --inactivity / lost ticket--> paused_system | cancelled_system
    paused_* --resume--> resuming --> transferring
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
import uuid

from lab.engine import errors, xml
from lab.engine.disks import ILLEGAL, LOCKED, OK
from lab.storage import StorageError

log = logging.getLogger("engine.transfers")

UNKNOWN = "unknown"
INITIALIZING = "initializing"
TRANSFERRING = "transferring"
RESUMING = "resuming"
PAUSED_SYSTEM = "paused_system"
PAUSED_USER = "paused_user"
CANCELLED_SYSTEM = "cancelled_system"
CANCELLED_USER = "cancelled_user"
FINALIZING_SUCCESS = "finalizing_success"
FINALIZING_FAILURE = "finalizing_failure"
FINALIZING_CLEANUP = "finalizing_cleanup"
FINISHED_SUCCESS = "finished_success"
FINISHED_FAILURE = "finished_failure"
FINISHED_CLEANUP = "finished_cleanup"

FINAL = (FINISHED_SUCCESS, FINISHED_FAILURE)
PAUSED = (PAUSED_SYSTEM, PAUSED_USER)

UPLOAD = "upload"
DOWNLOAD = "download"
NBD = "nbd"
FILE = "file"

# StorageConstants: room for qcow2 metadata in a file-backend upload ticket.
QCOW_OVERHEAD_FACTOR = 1.1
QCOW_HEADER_OVERHEAD = 1024**2

# The engine's job description for commands without a template.
JOB_DESCRIPTION = "TransferDiskImage"


class Transfers:
    def __init__(self, engine):
        self.engine = engine
        self.db = engine.db
        self.settings = engine.settings
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._last_cleanup = 0.0

    # REST operations.

    def add(self, node: xml.Node, correlation_id: str | None) -> dict:
        request = self._parse(node)
        transfer_id = str(uuid.uuid4())
        with self._lock(transfer_id):
            with self.db.transaction():
                disk = self._validate(request)
                now = time.time()
                transfer = {
                    "id": transfer_id,
                    "disk_id": disk["id"],
                    "image_id": disk["image_id"],
                    "direction": request["direction"],
                    # The entity shows the disk's format when the request had none.
                    "format": request["format"] or disk["format"],
                    "backend": NBD if request["format"] == "raw" else FILE,
                    "phase": INITIALIZING,
                    "host_id": None,
                    "ticket_id": None,
                    "nbd_url": None,
                    "transfer_size": None,
                    "sparse": int(self._sparse_ticket(disk)),
                    "inactivity_timeout": request["inactivity_timeout"],
                    "timeout_policy": request["timeout_policy"],
                    "shallow": int(request["shallow"]),
                    "transferred": 0,
                    "active": 0,
                    "session_expiration": None,
                    "retry_extend": 1,
                    "job_id": None,
                    "created": now,
                    "last_updated": now,
                    "ended": None,
                }
                self.db.insert("image_transfers", transfer)
                self.db.record("transfer", transfer_id, INITIALIZING)
                self.engine.disks.set_status(disk["id"], LOCKED)
                job_id = self.engine.jobs.start(JOB_DESCRIPTION, correlation_id)
                self.db.update("image_transfers", transfer_id, job_id=job_id)
            log.info(
                "Transfer %s: %s of disk %s, backend %s",
                transfer_id,
                transfer["direction"],
                disk["id"],
                transfer["backend"],
            )
            transfer = self.get(transfer_id)
            try:
                self._start_session(transfer, disk)
            except Exception:
                log.exception("Transfer %s: setup failed", transfer_id)
                self._stop_by_system(transfer, "setup failed")
        return self.get(transfer_id)

    def get(self, transfer_id: str) -> dict:
        transfer = self.db.get("image_transfers", transfer_id)
        if transfer is None:
            raise errors.not_found()
        return transfer

    def list(self) -> list[dict]:
        return self.db.all("SELECT * FROM image_transfers ORDER BY created")

    def act(self, transfer_id: str, verb: str) -> None:
        """finalize, cancel, pause, resume or extend (TransferImageStatusCommand)."""
        targets = {
            "finalize": FINALIZING_SUCCESS,
            "cancel": CANCELLED_USER,
            "pause": PAUSED_USER,
            "resume": RESUMING,
            "extend": None,
        }
        target = targets[verb]
        with self._lock(transfer_id), self.db.transaction():
            transfer = self.db.get("image_transfers", transfer_id)
            if transfer is None:
                # The engine answers with a transfer in phase "unknown".
                log.info("Transfer %s: %s of a missing transfer", transfer_id, verb)
                return
            phase = transfer["phase"]
            if target == RESUMING and phase not in PAUSED:
                raise errors.cannot_resume_transfer()
            if target == PAUSED_USER and transfer["direction"] == DOWNLOAD:
                raise errors.cannot_pause_download()
            changes = {"last_updated": time.time()}
            if target is not None and phase not in FINAL:
                changes["phase"] = target
                self.db.record("transfer", transfer_id, target)
                log.info("Transfer %s: %s, %s -> %s", transfer_id, verb, phase, target)
            self.db.update("image_transfers", transfer_id, **changes)
        self.engine.monitor.wake()

    def render(self, transfer: dict):
        host = self.engine.host
        ticket = transfer["ticket_id"]
        transfer_url = host.transfer_url(ticket) if ticket else None
        proxy_url = host.proxy_url(ticket) if ticket else None
        return xml.image_transfer(transfer, transfer_url, proxy_url)

    def open(self) -> list[dict]:
        """Transfers not in a final phase, oldest first."""
        return self.db.all(
            "SELECT * FROM image_transfers WHERE phase NOT IN (?, ?) ORDER BY created", FINAL
        )

    def open_disk_ids(self) -> set[str]:
        return {t["disk_id"] for t in self.open()}

    def open_job_ids(self) -> set[str]:
        return {t["job_id"] for t in self.open() if t["job_id"]}

    # The monitor's visit.

    def poll(self) -> None:
        for row in self.open():
            with self._lock(row["id"]):
                transfer = self.db.get("image_transfers", row["id"])
                if transfer is None or transfer["phase"] in FINAL:
                    continue
                handler = getattr(self, "_handle_" + transfer["phase"])
                try:
                    handler(transfer)
                except Exception:
                    log.exception("Transfer %s: handling %s failed", row["id"], transfer["phase"])
        now = time.time()
        if now - self._last_cleanup >= 60:
            self._last_cleanup = now
            self._cleanup(now)

    def recover(self) -> None:
        """At start-up: a transfer caught in setup lost its session with the old engine."""
        for transfer in self.db.all(
            "SELECT * FROM image_transfers WHERE phase = ?", (INITIALIZING,)
        ):
            self._stop_by_system(transfer, "engine restarted during setup")

    # Phase handlers, one visit each.

    def _handle_initializing(self, transfer: dict) -> None:
        # Setup runs inside the POST; nothing to do until it ends.
        pass

    def _handle_transferring(self, transfer: dict) -> None:
        if not self._extend_if_needed(transfer):
            return
        self._poll_ticket(transfer)

    def _handle_resuming(self, transfer: dict) -> None:
        self.engine.disks.set_status(transfer["disk_id"], LOCKED)
        if self._extend_if_needed(transfer):
            self._set_phase(transfer, TRANSFERRING)

    def _handle_paused_system(self, transfer: dict) -> None:
        # Paused transfers keep their ticket but do not extend it.
        pass

    _handle_paused_user = _handle_paused_system

    def _handle_cancelled_user(self, transfer: dict) -> None:
        self._set_phase(transfer, FINALIZING_CLEANUP)

    def _handle_cancelled_system(self, transfer: dict) -> None:
        self._set_phase(transfer, FINALIZING_FAILURE)

    def _handle_finalizing_success(self, transfer: dict) -> None:
        if not self._stop_session(transfer):
            return
        if transfer["direction"] == DOWNLOAD:
            self._end(transfer, succeeded=True)
            return
        disk = self.engine.disks.get(transfer["disk_id"])
        volume = self.engine.disks.volume(disk)
        try:
            if volume is None:
                raise StorageError(f"disk {disk['id']} has no volume")
            volume.verify()
        except StorageError as e:
            log.error("Transfer %s: verifying the uploaded volume failed: %s", transfer["id"], e)
            self.engine.disks.set_status(disk["id"], ILLEGAL)
            self._set_phase(transfer, FINALIZING_FAILURE)
            return
        self.engine.disks.refresh(disk["id"])
        self._end(transfer, succeeded=True)

    def _handle_finalizing_failure(self, transfer: dict) -> None:
        if self._cleanup_session(transfer):
            self._end(transfer, succeeded=False)

    def _handle_finalizing_cleanup(self, transfer: dict) -> None:
        if self._cleanup_session(transfer):
            self._set_phase(transfer, FINISHED_CLEANUP)

    def _handle_finished_cleanup(self, transfer: dict) -> None:
        self._end(transfer, succeeded=False)

    # Session helpers.

    def _start_session(self, transfer: dict, disk: dict) -> None:
        host = self.engine.host
        volume = self.engine.disks.volume(disk)
        if volume is None:
            log.error("Transfer %s: disk %s has no volume", transfer["id"], disk["id"])
            self._set_phase(transfer, FINALIZING_FAILURE)
            return
        upload = transfer["direction"] == UPLOAD
        try:
            if transfer["backend"] == NBD:
                nbd_url = host.start_nbd(
                    volume,
                    readonly=not upload,
                    backing=not transfer["shallow"],
                    detect_zeroes=True,
                    discard=bool(transfer["sparse"]),
                    # vdsm names the NBD server after the transfer command.
                    server_id=transfer["id"],
                )
                url = nbd_url
            else:
                nbd_url = None
                url = "file://" + volume.path
        except Exception as e:
            log.error("Transfer %s: starting the NBD server failed: %s", transfer["id"], e)
            self._stop_by_system(transfer, "NBD server failed to start")
            return
        size = self._transfer_size(transfer, disk, volume)
        ticket_id = str(uuid.uuid4())
        ticket = {
            "uuid": ticket_id,
            "size": size,
            "ops": ["write"] if upload else ["read"],
            "timeout": self.settings.client_ticket_validity,
            "inactivity_timeout": transfer["inactivity_timeout"],
            "url": url,
            "transfer_id": transfer["id"],
            "sparse": bool(transfer["sparse"]),
            "dirty": False,
        }
        try:
            host.add_ticket(ticket)
        except Exception as e:
            log.error("Transfer %s: adding the ticket failed: %s", transfer["id"], e)
            if nbd_url is not None:
                self._stop_nbd(nbd_url)
            self._stop_by_system(transfer, "ticket not added")
            return
        with self.db.transaction():
            self.db.update(
                "image_transfers",
                transfer["id"],
                host_id=host.id,
                ticket_id=ticket_id,
                nbd_url=nbd_url,
                transfer_size=size,
                session_expiration=time.time() + self.settings.client_ticket_validity,
            )
            self._set_phase(transfer, TRANSFERRING)

    def _transfer_size(self, transfer: dict, disk: dict, volume) -> int:
        """The byte range the ticket allows (getTransferSize in the engine)."""
        virtual_size = disk["provisioned_size"]
        if transfer["backend"] == NBD or disk["format"] == "raw":
            return virtual_size
        if transfer["direction"] == DOWNLOAD:
            return os.path.getsize(volume.path)
        if volume.lv_size is not None:
            return volume.lv_size
        # Room for a fully allocated qcow2 plus its header.
        return math.ceil(virtual_size * QCOW_OVERHEAD_FACTOR) + QCOW_HEADER_OVERHEAD

    def _sparse_ticket(self, disk: dict) -> bool:
        # imageio may punch holes only in sparse volumes on file storage.
        sd = self.engine.inventory.storage_domain(disk["storage_domain_id"])
        return bool(disk["sparse"]) and sd["kind"] == "file"

    def _extend_if_needed(self, transfer: dict) -> bool:
        """Renew the host ticket before it expires; False when the transfer stopped."""
        now = time.time()
        expiration = transfer["session_expiration"] or 0
        if now < expiration - self.settings.host_ticket_refresh_allowance:
            return True
        timeout = self.settings.host_ticket_validity
        try:
            self.engine.host.extend_ticket(transfer["ticket_id"], timeout)
        except Exception as e:
            log.warning("Transfer %s: renewing the ticket failed: %s", transfer["id"], e)
            if transfer["retry_extend"]:
                # One more chance on the next visit, as the engine gives.
                self.db.update("image_transfers", transfer["id"], retry_extend=0)
                return True
            self.db.update("image_transfers", transfer["id"], retry_extend=1)
            self._stop_by_system(transfer, "ticket renewal failed")
            return False
        self.db.update("image_transfers", transfer["id"], session_expiration=now + timeout)
        return True

    def _poll_ticket(self, transfer: dict) -> None:
        try:
            info = self.engine.host.get_ticket(transfer["ticket_id"])
        except Exception as e:
            log.warning("Transfer %s: reading the ticket failed: %s", transfer["id"], e)
            info = None
        if info is None:
            self._stop_by_system(transfer, "missing ticket")
            return
        transferred = int(info.get("transferred") or 0)
        active = bool(info.get("active"))
        if transferred != transfer["transferred"] or active != bool(transfer["active"]):
            self.db.update(
                "image_transfers",
                transfer["id"],
                transferred=transferred,
                active=int(active),
                last_updated=time.time(),
            )
        if (
            transfer["direction"] == DOWNLOAD
            and transfer["transfer_size"]
            and transferred == transfer["transfer_size"]
            and not active
            and not transfer["active"]
        ):
            # A complete download idle on two visits in a row: the engine
            # finalizes it itself (meant for browser downloads).
            self._set_phase(transfer, FINALIZING_SUCCESS)
            return
        timeout = transfer["inactivity_timeout"]
        idle = info.get("idle_time")
        if timeout > 0 and idle is not None and idle > timeout and not active:
            self._inactive(transfer, idle)

    def _inactive(self, transfer: dict, idle: int) -> None:
        policy = transfer["timeout_policy"]
        log.warning(
            "Transfer %s: no activity for %s s (inactivity_timeout %s, policy %s)",
            transfer["id"],
            idle,
            transfer["inactivity_timeout"],
            policy,
        )
        if policy == "pause":
            self._set_phase(transfer, PAUSED_SYSTEM)
        elif policy == "cancel" or transfer["direction"] == DOWNLOAD:
            self._set_phase(transfer, CANCELLED_SYSTEM)
        else:
            self._stop_by_system(transfer, "inactivity timeout")

    def _stop_by_system(self, transfer: dict, why: str) -> None:
        phase = PAUSED_SYSTEM if transfer["direction"] == UPLOAD else CANCELLED_SYSTEM
        log.warning("Transfer %s stopped by system (%s): %s", transfer["id"], why, phase)
        self._set_phase(transfer, phase)

    def _stop_session(self, transfer: dict) -> bool:
        """Remove the ticket and stop qemu-nbd; False when the ticket is still in use."""
        ticket_id = transfer["ticket_id"]
        if ticket_id:
            try:
                removed = self.engine.host.remove_ticket(ticket_id)
            except Exception as e:
                log.warning("Transfer %s: removing the ticket failed: %s", transfer["id"], e)
                removed = False
            if removed is False:
                log.info("Transfer %s: ticket still in use, retrying", transfer["id"])
                return False
        if transfer["nbd_url"]:
            self._stop_nbd(transfer["nbd_url"])
        self.db.update("image_transfers", transfer["id"], ticket_id=None, nbd_url=None)
        transfer["ticket_id"] = transfer["nbd_url"] = None
        return True

    def _cleanup_session(self, transfer: dict) -> bool:
        if not self._stop_session(transfer):
            return False
        status = ILLEGAL if transfer["direction"] == UPLOAD else OK
        self._set_disk_status(transfer, status)
        return True

    def _stop_nbd(self, nbd_url: str) -> None:
        try:
            self.engine.host.stop_nbd(nbd_url)
        except Exception as e:
            log.warning("Stopping NBD server %s failed: %s", nbd_url, e)

    def _end(self, transfer: dict, succeeded: bool) -> None:
        """endSuccessfully / endWithFailure: the disk's fate, then the final phase."""
        if succeeded:
            self._set_disk_status(transfer, OK)
        elif transfer["direction"] == UPLOAD:
            disk = self.db.get("disks", transfer["disk_id"])
            if disk is not None:
                try:
                    self.engine.disks.destroy(disk)
                except StorageError as e:
                    log.error(
                        "Transfer %s: removing disk %s failed: %s", transfer["id"], disk["id"], e
                    )
        else:
            self._set_disk_status(transfer, OK)
        with self.db.transaction():
            self.db.update("image_transfers", transfer["id"], ended=time.time())
            self._set_phase(transfer, FINISHED_SUCCESS if succeeded else FINISHED_FAILURE)
        self.engine.jobs.end(transfer["job_id"], succeeded)

    def _set_disk_status(self, transfer: dict, status: str) -> None:
        if self.db.get("disks", transfer["disk_id"]) is not None:
            self.engine.disks.set_status(transfer["disk_id"], status)

    def _set_phase(self, transfer: dict, phase: str) -> None:
        with self.db.transaction():
            self.db.update("image_transfers", transfer["id"], phase=phase, last_updated=time.time())
            self.db.record("transfer", transfer["id"], phase)
        log.info("Transfer %s: %s -> %s", transfer["id"], transfer["phase"], phase)
        transfer["phase"] = phase

    def _cleanup(self, now: float) -> None:
        """Forget ended transfers as the engine's DbEntityCleanupManager does."""
        self.db.run(
            "DELETE FROM image_transfers "
            "WHERE (phase = ? AND ended < ?) OR (phase = ? AND ended < ?)",
            (
                FINISHED_SUCCESS,
                now - self.settings.succeeded_transfer_retention,
                FINISHED_FAILURE,
                now - self.settings.failed_transfer_retention,
            ),
        )
        known = {row["id"] for row in self.db.all("SELECT id FROM image_transfers")}
        with self._locks_guard:
            for transfer_id in [t for t in self._locks if t not in known]:
                del self._locks[transfer_id]

    # Request parsing and validation.

    def _parse(self, node: xml.Node) -> dict:
        direction = node.enum("direction", (UPLOAD, DOWNLOAD), "ImageTransferDirection") or UPLOAD
        target = None
        for tag in ("disk", "snapshot", "image"):
            child = node.child(tag)
            if child is not None and child.id:
                target = (tag, child.id)
                break
        if target is None:
            if direction == DOWNLOAD:
                raise errors.image_not_specified_for_download()
            raise errors.incomplete("ImageTransfer", ["disk.id|snapshot.id|image.id"], "add")
        host = node.child("host")
        inactivity = node.integer("inactivity_timeout")
        if inactivity is not None and inactivity < 0:
            raise errors.bad_request(f"Invalid inactivity_timeout {inactivity}: must be >= 0")
        return {
            "direction": direction,
            "target": target,
            "format": node.enum("format", ("cow", "raw"), "DiskFormat"),
            "host_id": host.id if host is not None else None,
            "inactivity_timeout": (
                self.settings.inactivity_timeout if inactivity is None else inactivity
            ),
            "timeout_policy": node.enum(
                "timeout_policy", ("legacy", "pause", "cancel"), "ImageTransferTimeoutPolicy"
            )
            or "legacy",
            "shallow": bool(node.boolean("shallow")),
        }

    def _validate(self, request: dict) -> dict:
        kind, target_id = request["target"]
        if kind == "snapshot":
            disk = self.engine.disks.by_image(target_id)
        else:
            disk = self.db.get("disks", target_id)
        if disk is None:
            raise errors.disk_not_exist(errors.ACTION_TRANSFER)
        if disk["status"] == ILLEGAL:
            raise errors.disks_illegal(errors.ACTION_TRANSFER, disk["alias"])
        if disk["status"] == LOCKED:
            raise errors.disks_locked(errors.ACTION_TRANSFER, disk["alias"])
        host_id = request["host_id"]
        if host_id is not None and host_id != self.engine.host.id:
            raise errors.host_not_exist()
        return disk

    def _lock(self, transfer_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[transfer_id]


class Monitor:
    """The thread visiting open transfers every poll interval, or at once when woken."""

    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._visit = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="transfer-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        self._wake.set()

    @contextlib.contextmanager
    def paused(self):
        """Hold visits off while the block runs."""
        with self._visit:
            yield

    def _run(self) -> None:
        interval = self.engine.settings.poll_interval
        while not self._stop.is_set():
            try:
                with self._visit:
                    self.engine.transfers.poll()
                    self.engine.jobs.cleanup(time.time())
            except Exception:
                log.exception("Transfer monitor visit failed")
            self._wake.wait(interval)
            self._wake.clear()
