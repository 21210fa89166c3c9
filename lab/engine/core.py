# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine: database, services, monitor and HTTPS server, wired together."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid

from lab.engine import api, hooks, server
from lab.engine.db import Database
from lab.engine.disks import Disks
from lab.engine.inventory import Inventory
from lab.engine.jobs import Jobs
from lab.engine.moves import Moves
from lab.engine.sso import Sso
from lab.engine.transfers import Monitor, Transfers
from lab.engine.vms import Vms

log = logging.getLogger("engine")


@dataclasses.dataclass
class Settings:
    """Engine configuration values; names follow the engine's config keys."""

    # How often the monitor visits open transfers. The engine's callbacks
    # settle at 10 s (AsyncCommandPollingRateInSeconds); the lab is quicker.
    poll_interval: float = 1.0
    # How long a new disk stays locked before its volume is created.
    disk_create_delay: float = 0.3
    # ImageTransferClientTicketValidityInSeconds
    client_ticket_validity: int = 300
    # ImageTransferHostTicketValidityInSeconds
    host_ticket_validity: int = 300
    # ImageTransferHostTicketRefreshAllowanceInSeconds
    host_ticket_refresh_allowance: int = 240
    # TransferImageClientInactivityTimeoutInSeconds
    inactivity_timeout: int = 60
    # SucceededImageTransferCleanupTimeInMinutes, FailedImageTransferCleanupTimeInMinutes
    succeeded_transfer_retention: int = 15 * 60
    failed_transfer_retention: int = 30 * 60
    # How often running VMs are looked at (vdsm's periodic VM stats).
    vm_poll_interval: float = 0.5
    # vdsm's GUEST_WAIT_TIMEOUT: a VM whose guest agent never answers turns
    # up this many seconds after it started.
    guest_wait_timeout: float = 60.0
    # How long a shutdown may take before the VM is reported up again.
    shutdown_timeout: float = 120.0


class Engine:
    def __init__(
        self,
        lab_dir: str,
        host,
        pki,
        username: str,
        password: str,
        settings: Settings | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
    ):
        self.lab_dir = os.path.abspath(lab_dir)
        self.host = host
        self.settings = settings or Settings()
        state_dir = os.path.join(self.lab_dir, "engine")
        os.makedirs(state_dir, exist_ok=True)
        self.db = Database(os.path.join(state_dir, "engine.db"))
        self.instance_id = self._meta_id("instance_id")
        self.user = {"id": self._meta_id("admin_user_id"), "name": username}
        self.inventory = Inventory(self.db, self.lab_dir, host)
        self.jobs = Jobs(self.db, self.user["id"])
        self.disks = Disks(self)
        self.transfers = Transfers(self)
        self.vms = Vms(self)
        self.moves = Moves(self)
        self.monitor = Monitor(self)
        self.vm_monitor = Periodic("vm-monitor", self.settings.vm_poll_interval, self.vms.poll)
        self.sso = Sso(self.db, username, password)
        self.faults = hooks.Faults()
        self.api = api.Api(self)
        self.hooks = hooks.Hooks(self)
        cert, key = pki.issue("engine", hosts=("localhost", "127.0.0.1"))
        self.ca_file = pki.ca_cert
        self.server = server.EngineServer(self, address, port, cert, key)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/ovirt-engine/api"

    @property
    def stock(self) -> bool:
        return self.db.get_meta("stock") == "true"

    @stock.setter
    def stock(self, value: bool) -> None:
        self.db.set_meta("stock", "true" if value else "false")

    def start(self) -> None:
        """Finish what a previous run left, then serve."""
        self.transfers.recover()
        self.disks.recover(self.transfers.open_disk_ids())
        self.jobs.fail_unfinished(self.transfers.open_job_ids())
        self.vms.recover()
        self.monitor.start()
        self.vm_monitor.start()
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="engine-http", daemon=True
        )
        self._thread.start()
        log.info("Engine serving %s", self.url)

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()
        self.vm_monitor.stop()
        self.monitor.stop()
        self.disks.wait()
        self.db.close()
        log.info("Engine stopped")

    def info(self) -> dict:
        domains = {
            sd["name"]: {"id": sd["id"], "kind": sd["kind"], "storage_type": sd["storage_type"]}
            for sd in self.inventory.storage_domains()
        }
        return {
            "engine_url": self.url,
            "ca_file": self.ca_file,
            "username": self.user["name"],
            "storage_domains": domains,
            "hooks_url": f"https://localhost:{self.port}/lab",
            "host": {"id": self.host.id, "name": self.host.name, "address": self.host.address},
            "stock": self.stock,
        }

    def _meta_id(self, key: str) -> str:
        value = self.db.get_meta(key)
        if value is None:
            value = str(uuid.uuid4())
            self.db.set_meta(key, value)
        return value


class Periodic:
    """A thread calling a function every interval seconds until stopped."""

    def __init__(self, name: str, interval: float, function):
        self.interval = interval
        self.function = function
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.function()
            except Exception:
                log.exception("%s failed", self._thread.name)
