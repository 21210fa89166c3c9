# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running VMs: one ``qemu-system-x86_64`` process each, driven over QMP.

A VM is started the way vdsm has libvirt start it, as far as the lab needs:
each disk opened with ``-blockdev`` through its whole chain (an external
disk's NBD backing included) on the device its interface names, I/O errors
stopping the VM (``werror=stop,rerror=stop``), a virtio-serial port for the
guest agent, the serial console written to a log file. QMP is spoken with the
QEMU project's ``qemu.qmp`` library, on one asyncio loop shared by every VM of
the host.

Under TCG by default: on these machines ``/dev/kvm`` exists but a stock kernel
makes no progress under it (see docs/lab.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from lab import storage
from lab.host.errors import HostError
from lab.host.process import START_TIMEOUT, Process, tail, unlink

log = logging.getLogger("lab.host.vms")

QEMU = "qemu-system-x86_64"
# How long a QMP command may take; blockdev-add of a slow NBD server included.
QMP_TIMEOUT = 30.0
# How long the guest agent has to answer one ping. The monitor pings the VMs
# one after the other, so this bounds a round; a later answer is read at the
# next ping.
AGENT_TIMEOUT = 0.05
AGENT_PORT = "org.qemu.guest_agent.0"
# qemu closes its monitor a moment before it exits once the guest powered
# off: how long a failed status query waits for that exit before it calls
# the VM paused.
EXIT_GRACE = 2.0
MIRROR_GRANULARITY = 1024**2
MIRROR_BUFFER = 64 * 1024**2

# Device models of the disk interfaces (DiskInterface in the API model) and
# the controller each one hangs on.
INTERFACES = {
    "virtio": "virtio-blk-pci",
    "virtio_scsi": "scsi-hd",
    "sata": "ide-hd",
}
SCSI_CONTROLLER = "ua-scsi0"
SATA_CONTROLLER = "ua-sata0"
SATA_PORTS = 6

# What query-status says, as the engine's VM statuses.
RUNNING = "running"
PAUSED = "paused"
DOWN = "down"


class VmError(HostError):
    """A VM cannot be started or driven; the message says why."""


class VmDisk:
    """A disk as a VM sees it: its chain (a qemu block node description),
    the interface, and whether it boots the VM or is read-only."""

    def __init__(
        self, disk_id, node, interface, bootable=False, read_only=False, node_name=None, reads=None
    ):
        if interface not in INTERFACES:
            raise VmError(
                f"Disk interface {interface!r} is not supported by the lab: use "
                f"{', '.join(INTERFACES)}"
            )
        self.id = disk_id
        self.node = node
        self.interface = interface
        self.bootable = bootable
        self.read_only = read_only
        # qemu limits node names to 31 characters; a moved disk's node is
        # named after its new volume.
        self.node_name = node_name or "d" + disk_id.replace("-", "")[:30]
        # The external image the chain reads (an NBD URL or a path), if any.
        self.reads = reads

    @property
    def device_id(self) -> str:
        # oVirt's user aliases: "ua-" and the device's id.
        return f"ua-{self.id}"

    @property
    def backend(self) -> str:
        """The device that holds the disk's block backend: for virtio-blk-pci
        its virtio child, else the device itself."""
        if self.interface == "virtio":
            return f"/machine/peripheral/{self.device_id}/virtio-backend"
        return self.device_id

    def blockdev(self) -> dict:
        node = dict(self.node, **{"node-name": self.node_name})
        if self.read_only:
            node["read-only"] = True
        return node

    def device(self, sata_port: int | None) -> dict:
        device = {
            "driver": INTERFACES[self.interface],
            "id": self.device_id,
            "drive": self.node_name,
            "serial": self.id.replace("-", "")[:20],
            "werror": "stop",
            "rerror": "stop",
        }
        if self.interface == "virtio_scsi":
            device["bus"] = f"{SCSI_CONTROLLER}.0"
        elif self.interface == "sata":
            device["bus"] = f"{SATA_CONTROLLER}.{sata_port}"
        if self.bootable:
            device["bootindex"] = 1
        return device


class Vm:
    """One VM process: start, power, hot-plug, status, guest agent."""

    def __init__(self, host, vm_id, name, memory, sockets, cores, threads, disks, accel="tcg"):
        self.host = host
        self.id = vm_id
        self.name = name
        self.memory = memory
        self.topology = (sockets, cores, threads)
        self.disks = {d.id: d for d in disks}
        self.accel = accel
        self.qmp_socket = os.path.join(host.vm_dir, vm_id + ".qmp")
        self.agent_socket = os.path.join(host.vm_dir, vm_id + ".qga")
        self.nbd_socket = os.path.join(host.vm_dir, vm_id + ".nbd")
        self._nbd_server = False
        self.log_path = os.path.join(host.log_dir, f"vm-{vm_id}.log")
        self.console_path = host.vm_console_path(vm_id)
        self._process: Process | None = None
        self._qmp: QMPClient | None = None
        self._agent: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self):
        """Start the process and connect to its QMP; the guest runs on return."""
        os.makedirs(self.host.vm_dir, exist_ok=True)
        unlink(self.console_path)
        self._process = Process.spawn(
            self._argv(),
            self.log_path,
            self.host.pid_dir,
            "vm-" + self.id,
            sockets=[self.qmp_socket, self.agent_socket],
        )
        try:
            self._connect()
        except BaseException:
            self.kill()
            raise

    def adopt(self) -> bool:
        """Take over this VM's qemu left running by an earlier lab process:
        True once its QMP answers again."""
        process = Process.adopt(os.path.join(self.host.pid_dir, "vm-" + self.id + ".json"))
        if process is None:
            return False
        self._process = process
        try:
            self._connect()
            # A moved disk's device runs on a node named after its new volume.
            for disk in self.disks.values():
                disk.node_name = self._node_of(disk) or disk.node_name
        except VmError as e:
            log.warning("Cannot take over VM %s: %s", self.name, e)
            self.kill()
            return False
        return True

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def status(self) -> str:
        """running, paused (by an I/O error or a stop) or down."""
        process = self._process
        if process is None or not process.alive():
            return DOWN
        try:
            state = self.qmp("query-status")
        except VmError:
            return DOWN if process.wait_exit(EXIT_GRACE) else PAUSED
        if state["running"]:
            return RUNNING
        if state["status"] in ("shutdown", "guest-panicked", "internal-error"):
            return DOWN
        return PAUSED

    def resume(self):
        self.qmp("cont")

    def powerdown(self):
        """The ACPI power button: the guest decides."""
        self.qmp("system_powerdown")

    def reset(self):
        self.qmp("system_reset")

    def kill(self):
        """Power off at once: no qemu process is left."""
        with contextlib.suppress(VmError):
            if self._qmp is not None and self.alive():
                self.qmp("quit")
        self._disconnect()
        if self._process is not None:
            self._process.stop()
            self._process = None
        self._close_agent()
        for path in (self.qmp_socket, self.agent_socket, self.nbd_socket):
            unlink(path)

    def guest_agent_answers(self) -> bool:
        """True when the guest agent answers a ping, as vdsm polls
        qemu-guest-agent."""
        try:
            if self._agent is None:
                agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                agent.settimeout(AGENT_TIMEOUT)
                agent.connect(self.agent_socket)
                self._agent = agent
            self._agent.sendall(b'{"execute": "guest-ping"}\n')
            return b'"return"' in self._agent.recv(4096)
        except OSError:
            # No answer yet: the next ping may get it.
            return False

    def hotplug(self, disk: VmDisk):
        if disk.interface == "sata":
            raise VmError(
                f"Cannot hot-plug disk {disk.id}: the SATA interface does not support "
                f"hot-plugging; use virtio or virtio_scsi"
            )
        self.qmp("blockdev-add", **disk.blockdev())
        try:
            self.qmp("device_add", **disk.device(None))
        except VmError:
            with contextlib.suppress(VmError):
                self.qmp("blockdev-del", **{"node-name": disk.node_name})
            raise
        self.disks[disk.id] = disk

    def unplug(self, disk_id: str, timeout: float = QMP_TIMEOUT):
        """Unplug a disk; the guest has to release the device (ACPI)."""
        disk = self.disks.get(disk_id)
        if disk is None:
            return
        with contextlib.suppress(VmError):
            self.qmp("device_del", id=disk.device_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.qmp("blockdev-del", **{"node-name": disk.node_name})
                break
            except VmError as e:
                if time.monotonic() > deadline:
                    raise VmError(
                        f"The guest did not release disk {disk_id} within {timeout:.0f} s: {e}"
                    ) from None
                time.sleep(0.1)
        del self.disks[disk_id]

    def mirror(self, disk_id: str, target: dict, node_name: str) -> str:
        """Start mirroring the disk's whole chain into target (a block node
        description without a backing) as live storage migration does: blocks
        the guest writes meanwhile are copied again until both sides match.
        Returns the job id."""
        disk = self._disk(disk_id)
        job_id = "mirror-" + disk.node_name
        self.qmp("blockdev-add", **dict(target, **{"node-name": node_name}))
        try:
            self.qmp(
                "blockdev-mirror",
                **{
                    "job-id": job_id,
                    "device": disk.node_name,
                    "target": node_name,
                    "sync": "full",
                    # The default background mode, as vdsm's blockCopy asks
                    # for (no synchronous writes). Cancelling a running
                    # write-blocking mirror corrupts qemu 7.2's heap.
                    "copy-mode": "background",
                    # Larger chunks than the 64 KiB clusters: a 4 GiB disk
                    # with 1 GiB of data mirrors about twice as fast.
                    "granularity": MIRROR_GRANULARITY,
                    "buf-size": MIRROR_BUFFER,
                    "auto-dismiss": False,
                },
            )
        except VmError:
            with contextlib.suppress(VmError):
                self.qmp("blockdev-del", **{"node-name": node_name})
            raise
        return job_id

    def block_jobs(self) -> list[dict]:
        return [{"id": j["id"], "type": j["type"], "status": j["status"]}
                for j in self.qmp("query-jobs")]  # fmt: skip

    def block_job(self, job_id: str) -> dict | None:
        """The job as query-jobs reports it (status, current and total
        progress, error), or None when it is gone."""
        for job in self.qmp("query-jobs"):
            if job["id"] == job_id:
                return job
        return None

    def pivot(self, disk_id: str, job_id: str, node: dict, node_name: str,
              timeout: float = QMP_TIMEOUT) -> None:  # fmt: skip
        """Complete a ready mirror: the device switches to the target node,
        whose description becomes the disk's chain; the old chain is closed."""
        disk = self._disk(disk_id)
        self.qmp("job-complete", id=job_id)
        self._wait_job(job_id, "concluded", timeout)
        job = self.block_job(job_id)
        self.qmp("job-dismiss", id=job_id)
        if job is not None and job.get("error"):
            raise VmError(f"Mirror of disk {disk_id} failed: {job['error']}")
        # The old top node and the backing it opened go; the NBD server of an
        # external disk is no longer needed.
        self.qmp("blockdev-del", **{"node-name": disk.node_name})
        self.disks[disk_id] = VmDisk(
            disk.id, node, disk.interface, disk.bootable, disk.read_only, node_name=node_name
        )

    def cancel_mirror(self, job_id: str, node_name: str, timeout: float = QMP_TIMEOUT) -> None:
        """Stop a mirror and drop its target; the VM goes on with its chain."""
        job = self.block_job(job_id)
        if job is not None:
            if job["status"] not in ("concluded", "null"):
                with contextlib.suppress(VmError):
                    # Aborts even a ready mirror, leaving the source as it was.
                    self.qmp("job-cancel", id=job_id)
                self._wait_job(job_id, "concluded", timeout)
            with contextlib.suppress(VmError):
                self.qmp("job-dismiss", id=job_id)
        with contextlib.suppress(VmError):
            self.qmp("blockdev-del", **{"node-name": node_name})

    def checksum(self, disk_id: str, algorithm: str, block_size: int) -> dict:
        """imageio's checksum of the disk as the VM sees it now, read through
        an NBD export of the device's node by the VM's own NBD server."""
        disk = self._disk(disk_id)
        storage.check_checksum(algorithm, block_size)
        node = self._node_of(disk)
        if node is None:
            raise VmError(f"Disk {disk_id} has no medium in VM {self.name}")
        if not self._nbd_server:
            unlink(self.nbd_socket)
            # nbd-server-start takes the legacy socket address form.
            self.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": self.nbd_socket}})
            self._nbd_server = True
        export = "checksum-" + uuid.uuid4().hex[:8]
        self.qmp("block-export-add", type="nbd", id=export, **{"node-name": node}, name=export)
        try:
            return storage.nbd_checksum(
                f"nbd:unix:{self.nbd_socket}:exportname={export}", algorithm, block_size
            )
        except RuntimeError as e:
            raise VmError(f"Cannot checksum disk {disk_id} of VM {self.name}: {e}") from None
        finally:
            with contextlib.suppress(VmError):
                self.qmp("block-export-del", id=export)

    def guest_write(self, disk_id: str, offset: int, length: int, pattern: int):
        """Write through the VM's own device, as its guest would."""
        disk = self._disk(disk_id)
        self.hmp(f'qemu-io -d {disk.backend} "write -P {pattern} {offset} {length}"')
        # The write is done when the command returns; a flush makes it durable.
        self.hmp(f'qemu-io -d {disk.backend} "flush"')

    def hmp(self, command: str) -> str:
        output = self.qmp("human-monitor-command", **{"command-line": command})
        if output.strip():
            raise VmError(f"{command!r} failed on VM {self.name}: {output.strip()}")
        return output

    def qmp(self, command: str, **arguments):
        """Run one QMP command; VmError with qemu's message when it fails."""
        with self._lock:
            client = self._qmp
        if client is None:
            raise VmError(f"VM {self.name} is not running")
        try:
            return self.host.qmp_loop.run(client.execute(command, arguments), QMP_TIMEOUT)
        except QMPError as e:
            raise VmError(f"QMP {command} failed on VM {self.name}: {e}") from None
        except (OSError, EOFError, TimeoutError) as e:
            raise VmError(f"QMP {command} failed on VM {self.name}: {e!r}") from None

    # Private helpers.

    def _wait_job(self, job_id: str, status: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            job = self.block_job(job_id)
            if job is None or job["status"] == status:
                return
            if time.monotonic() > deadline:
                raise VmError(f"Block job {job_id} is still {job['status']} after {timeout:.0f} s")
            time.sleep(0.05)

    def _node_of(self, disk) -> str | None:
        """The node the disk's device reads now (a mirror's filter during a
        mirror), or None when it has no medium."""
        for block in self.qmp("query-block"):
            if block.get("qdev") == disk.backend and "inserted" in block:
                return block["inserted"]["node-name"]
        return None

    def _disk(self, disk_id):
        disk = self.disks.get(disk_id)
        if disk is None:
            raise VmError(f"Disk {disk_id} is not plugged into VM {self.name}")
        return disk

    def _argv(self) -> list[str]:
        sockets, cores, threads = self.topology
        argv = [
            QEMU,
            "-name", f"guest={self.name},debug-threads=on",
            "-uuid", self.id,
            "-machine", f"pc,accel={self.accel}",
            "-m", f"{self.memory // 1024**2}M",
            "-smp", f"{sockets * cores * threads},sockets={sockets},cores={cores},"
                    f"threads={threads}",
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-serial", f"file:{self.console_path}",
            "-nic", "none",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=ua-serial0",
            "-chardev", f"socket,id=qga0,path={self.agent_socket},server=on,wait=off",
            "-device", f"virtserialport,bus=ua-serial0.0,chardev=qga0,name={AGENT_PORT}",
            "-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}",
            "-device", f"ahci,id={SATA_CONTROLLER}",
        ]  # fmt: skip
        sata_port = 0
        for disk in self.disks.values():
            port = None
            if disk.interface == "sata":
                if sata_port == SATA_PORTS:
                    raise VmError(f"VM {self.name} has more than {SATA_PORTS} SATA disks")
                port, sata_port = sata_port, sata_port + 1
            argv += ["-blockdev", json.dumps(disk.blockdev())]
            argv += ["-device", json.dumps(disk.device(port))]
        return argv

    def _connect(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.alive():
                raise VmError(
                    f"{QEMU} exited while starting VM {self.name}; last lines of "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            client = QMPClient(self.name)
            try:
                self.host.qmp_loop.run(client.connect(self.qmp_socket), QMP_TIMEOUT)
                with self._lock:
                    self._qmp = client
                return
            except (OSError, QMPError):
                pass
            if time.monotonic() > deadline:
                raise VmError(
                    f"{QEMU} did not answer on {self.qmp_socket} within {START_TIMEOUT:.0f} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.02)

    def _disconnect(self):
        with self._lock:
            client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                self.host.qmp_loop.run(client.disconnect(), QMP_TIMEOUT)

    def _close_agent(self):
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()


class QmpLoop:
    """The asyncio loop every VM's QMP client runs on, in its own thread."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coroutine, timeout: float):
        """Run coroutine on the loop and wait for its result."""
        loop = self._start()
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, timeout), loop)
        return future.result()

    def stop(self):
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="qmp-loop", daemon=True
                )
                self._thread.start()
            return self._loop
