# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Storage domains and volumes of the lab, following vdsm's rules.

A file domain (NFS in oVirt) keeps each volume as a file: raw sparse, raw
preallocated, or qcow2 growing freely. A block domain (iSCSI) keeps each volume
in a logical volume of fixed size; the lab models the LV as a file of exactly
``lv_size`` bytes and serves it through qemu's ``raw`` driver limited to that
size, so a qcow2 that outgrows its LV fails with ENOSPC as it does on a host.

Layout under ``<lab dir>/domains/<name>/``::

    dom_md/metadata.json        domain id, name, kind, size
    volumes/<id>                the volume (file domain) or its "LV"
    volumes/<id>.meta           volume metadata (JSON), written last

A volume exists once its metadata exists, so a crash while creating one leaves
nothing that a restarted lab would mistake for a volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import subprocess
import tempfile
import time
import uuid
from urllib.parse import urlparse

from ovirt_imageio._internal import qemu_nbd, util
from ovirt_imageio._internal.backends import nbd as nbd_backend
from ovirt_imageio._internal.handlers import checksum as imageio_checksum
from ovirt_imageio._internal.nbd import UnixAddress

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

FORMATS = ("raw", "qcow2")
STORAGE_TYPES = {"file": "nfs", "block": "iscsi"}

# vdsm rounds every capacity and initial size up to 4 KiB
# (lib/vdsm/storage/volume.py, create).
CAPACITY_ALIGNMENT = 4 * KiB
# LVM allocates in extents; oVirt creates VGs with 128 MiB extents
# (lib/vdsm/storage/constants.py VG_EXTENT_SIZE).
BLOCK_EXTENT = 128 * MiB
# A sparse qcow2 LV gets its initial size plus 10% for qcow2 metadata, and the
# largest useful LV is the capacity plus the same overhead
# (lib/vdsm/storage/blockVolume.py, constants.py COW_OVERHEAD).
QCOW_OVERHEAD = 1.1
# Without an initial size, a sparse qcow2 LV starts at one utilization chunk
# (lib/vdsm/common/config.py.in volume_utilization_chunk_mb).
VOLUME_UTILIZATION_CHUNK = 2560 * MiB
# Storage format V5 domains create qcow2 images with compat 1.1 and accept
# both compat levels on upload.
QCOW2_COMPAT = "1.1"
SUPPORTED_QCOW2_COMPAT = ("0.10", "1.1")
# A block domain's VG, when no size is given.
DEFAULT_BLOCK_DOMAIN_SIZE = 100 * GiB

# imageio's /checksum limits (ovirt_imageio/_internal/handlers/checksum.py).
CHECKSUM_BLOCK_SIZE = 4 * MiB
CHECKSUM_MIN_BLOCK_SIZE = 1 * MiB
CHECKSUM_MAX_BLOCK_SIZE = 16 * MiB
CHECKSUM_ALIGNMENT = 4 * KiB

DIRECT_IO_ALIGNMENT = 4 * KiB

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StorageError(Exception):
    """A storage domain cannot be opened or used."""


class VolumeError(StorageError):
    """A volume request that vdsm would refuse, or a volume that fails checks."""


class VolumeNotFound(VolumeError):
    """No volume with this id in the domain."""


class Volume:
    """One volume of a storage domain, as described by its metadata."""

    def __init__(self, domain: StorageDomain, meta: dict):
        self.domain = domain
        self.id = meta["id"]
        self.format = meta["format"]
        self.capacity = meta["capacity"]
        self.sparse = meta["sparse"]
        self.lv_size = meta.get("lv_size")
        self.initial_size = meta.get("initial_size")
        # What qemu reads where the volume has no data: an external disk's
        # URL (or path), opened read-only, in backing_format.
        self.backing = meta.get("backing")
        self.backing_format = meta.get("backing_format")
        self.path = os.path.join(domain.volumes_dir, self.id)

    def __repr__(self):
        return (
            f"<Volume {self.id} {self.format} capacity={self.capacity} "
            f"sparse={self.sparse} lv_size={self.lv_size} domain={self.domain.name}>"
        )

    def actual_size(self) -> int:
        """Bytes the volume takes on storage, as vdsm reports truesize."""
        if self.lv_size is not None:
            return self.lv_size
        return os.stat(self.path).st_blocks * 512

    def qemu_json(self, readonly: bool = False) -> str:
        """A ``json:{...}`` filename opening the volume as qemu on a host would."""
        return "json:" + json.dumps(self.qemu_node(readonly))

    def qemu_node(self, readonly: bool = False, direct: bool = False) -> dict:
        """The qemu block node description of the volume, for ``-blockdev``.

        direct: open the file with O_DIRECT, as a VM's disks are (vdsm gives
        libvirt ``cache="none"``); a domain supports it (check_direct_io).
        """
        file_node = self._file_node()
        if direct:
            inner = file_node.get("file", file_node)
            inner["cache"] = {"direct": True}
        if self.format == "raw" and file_node["driver"] == "raw":
            # The LV bound is itself a raw node.
            node = file_node
        else:
            node = {"driver": self.format, "file": file_node}
        if readonly:
            node["read-only"] = True
        return node

    def verify(self) -> None:
        """Check the volume as vdsm's VerifyUntrustedVolume does after an upload.

        The format is probed, not given, so bytes of the wrong format written
        through the file backend are caught here.
        """
        info = _qemu_img_info(self._probe_filename())
        detected = info.get("format")
        if detected != self.format:
            raise VolumeError(
                f"Volume {self.id}: format detected by qemu is {detected}, "
                f"while the volume format is {self.format}"
            )
        virtual_size = info.get("virtual-size", 0)
        if virtual_size > self.capacity:
            raise VolumeError(
                f"Volume {self.id}: image virtual size {virtual_size} is bigger "
                f"than volume capacity {self.capacity}"
            )
        backing = info.get("backing-filename")
        if backing:
            raise VolumeError(
                f"Volume {self.id}: image has backing file {backing!r}, "
                f"but the volume has no parent"
            )
        if detected == "qcow2":
            compat = info.get("format-specific", {}).get("data", {}).get("compat")
            if compat not in SUPPORTED_QCOW2_COMPAT:
                raise VolumeError(
                    f"Volume {self.id}: qcow2 compat {compat!r} is not supported "
                    f"by storage domain {self.domain.name}"
                )

    def checksum(self, algorithm: str = "blake2b", block_size: int = CHECKSUM_BLOCK_SIZE) -> dict:
        """The checksum imageio's ``/checksum`` returns for a ticket on this volume.

        Computed on the guest-visible data of the volume in its own format,
        like a download through the NBD backend would see it.
        """
        check_checksum(algorithm, block_size)
        # Fails fast, with qemu's reason, when a writer holds the volume.
        _qemu_img_info(self.qemu_json(readonly=True))
        # A block volume is bounded by its LV, as a host sees it.
        with tempfile.TemporaryDirectory(prefix="lab-checksum-") as tmp:
            sock = UnixAddress(os.path.join(tmp, "sock"))
            try:
                server = qemu_nbd.run(
                    self.path, self.format, sock, read_only=True, shared=1, size=self.lv_size
                )
                with server:
                    return nbd_checksum(sock.url(), algorithm, block_size)
            except RuntimeError as e:
                raise VolumeError(f"Cannot checksum volume {self.id}: {e}") from None

    def extend(self, capacity: int) -> None:
        """Grow the virtual size, as vdsm's extendVolumeSize does."""
        capacity = _round_up(_positive_int("capacity", capacity), CAPACITY_ALIGNMENT)
        if capacity < self.capacity:
            raise VolumeError(
                f"Volume {self.id}: cannot shrink from {self.capacity} to {capacity} bytes"
            )
        if capacity == self.capacity:
            return
        with self.domain._locked():
            meta = self.domain._read_meta(self.id)
            lv_size = meta.get("lv_size")
            if self.format == "raw" and lv_size is not None:
                # A raw LV is the disk: extending it takes space from the VG.
                new_lv = _round_up(capacity, self.domain.block_extent)
                self.domain._check_space(new_lv - lv_size)
                os.truncate(self.path, new_lv)
                meta["lv_size"] = meta["capacity"] = new_lv
            else:
                if self.format == "raw":
                    os.truncate(self.path, capacity)
                    if not self.sparse:
                        _fallocate(self.path, meta["capacity"], capacity - meta["capacity"])
                else:
                    _run(["qemu-img", "resize", self.qemu_json(), str(capacity)])
                meta["capacity"] = capacity
            self.domain._write_meta(meta)
        self.capacity = meta["capacity"]
        self.lv_size = meta.get("lv_size")

    # Private helpers.

    def _file_node(self) -> dict:
        node = {"driver": "file", "filename": self.path}
        if self.lv_size is not None:
            # The LV boundary: writes past it fail with ENOSPC in qemu.
            node = {"driver": "raw", "size": self.lv_size, "file": node}
        return node

    def _probe_filename(self) -> str:
        if self.lv_size is None:
            return self.path
        # No top driver: qemu probes the format inside the LV bounds.
        return "json:" + json.dumps({"file": self._file_node()})


class StorageDomain:
    """A data storage domain: a directory of volumes plus metadata."""

    block_extent = BLOCK_EXTENT

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.id = meta["id"]
        self.name = meta["name"]
        self.kind = meta["kind"]
        self.storage_type = STORAGE_TYPES[self.kind]
        self.size = meta.get("size")
        self.volumes_dir = os.path.join(path, "volumes")

    def __repr__(self):
        return f"<StorageDomain {self.name} {self.kind} id={self.id}>"

    @classmethod
    def open(
        cls,
        lab_dir: str,
        name: str,
        kind: str | None = None,
        id: str | None = None,
        size: int | None = None,
    ) -> StorageDomain:
        """Open the domain called name under lab_dir, creating it if needed.

        kind ("file" or "block") is required to create a domain; when given
        for an existing one it must match, as must id.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise StorageError(
                f"Invalid storage domain name {name!r}: use letters, digits, '_', '.', '-'"
            )
        if kind is not None and kind not in STORAGE_TYPES:
            raise StorageError(f"Invalid storage domain kind {kind!r}: use 'file' or 'block'")
        if size is not None:
            _positive_int("size", size)

        path = os.path.join(os.path.abspath(lab_dir), "domains", name)
        meta_path = os.path.join(path, "dom_md", "metadata.json")
        meta = _read_json(meta_path)
        if meta is None:
            if kind is None:
                raise StorageError(
                    f"Storage domain {name!r} does not exist in {lab_dir}: give its kind "
                    f"('file' or 'block') to create it"
                )
            meta = _create_domain(path, meta_path, name, kind, id, size)
        else:
            if kind is not None and meta["kind"] != kind:
                raise StorageError(
                    f"Storage domain {name!r} in {lab_dir} is a {meta['kind']} domain, not {kind}"
                )
            if id is not None and meta["id"] != id:
                raise StorageError(
                    f"Storage domain {name!r} in {lab_dir} has id {meta['id']}, not {id}"
                )
        return cls(path, meta)

    @classmethod
    def list(cls, lab_dir: str) -> list[StorageDomain]:
        """Every domain found under lab_dir, sorted by name."""
        top = os.path.join(os.path.abspath(lab_dir), "domains")
        try:
            names = sorted(os.listdir(top))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = os.path.join(top, name)
            meta = _read_json(os.path.join(path, "dom_md", "metadata.json"))
            if meta is not None:
                found.append(cls(path, meta))
        return found

    def create_volume(
        self,
        vol_id: str,
        fmt: str,
        capacity: int,
        sparse: bool,
        initial_size: int | None = None,
        backing: tuple[str, str] | None = None,
        backing_file: str | None = None,
    ) -> Volume:
        """Create a volume as vdsm's createVolume does, refusing what it refuses.

        An initial_size of 0 means "not given", as the engine sends it.
        backing, (filename, format), makes a sparse qcow2 overlay on a file
        domain whose unwritten data comes from that image: an external disk.
        backing_file, when given, is what the qcow2 header names instead of
        backing's filename (the same image, opened with other options).
        """
        if backing is not None and (fmt != "qcow2" or not sparse or self.kind != "file"):
            raise VolumeError(
                f"An external disk must be a sparse qcow2 volume on a file storage domain; "
                f"{self.name} is a {self.kind} domain"
            )
        _check_volume_id(vol_id)
        if fmt not in FORMATS:
            raise VolumeError(f"Invalid volume format {fmt!r}: use 'raw' or 'qcow2'")
        if not isinstance(sparse, bool):
            raise VolumeError(f"Invalid sparse value {sparse!r}: use true or false")
        capacity = _round_up(_positive_int("capacity", capacity), CAPACITY_ALIGNMENT)
        if initial_size is not None:
            if not isinstance(initial_size, int) or isinstance(initial_size, bool):
                raise VolumeError(f"Invalid initial size {initial_size!r}: use bytes")
            if initial_size < 0:
                raise VolumeError(f"Invalid initial size {initial_size}: must not be negative")
            initial_size = _round_up(initial_size, CAPACITY_ALIGNMENT) or None

        if self.kind == "block":
            lv_size = self._block_allocation(fmt, capacity, sparse, initial_size)
            if fmt == "raw":
                # What the guest sees of a raw LV is the whole LV; vdsm records
                # the capacity accordingly.
                capacity = lv_size
        else:
            self._check_file_parameters(fmt, capacity, sparse, initial_size)
            lv_size = None

        meta = {
            "id": vol_id,
            "format": fmt,
            "capacity": capacity,
            "sparse": sparse,
            "lv_size": lv_size,
            "initial_size": initial_size,
            "created": int(time.time()),
        }
        if backing is not None:
            meta["backing"], meta["backing_format"] = backing
            meta["backing_file"] = backing_file or backing[0]
        with self._locked():
            if os.path.exists(self._meta_path(vol_id)):
                raise VolumeError(f"Volume {vol_id} already exists in storage domain {self.name}")
            if lv_size is not None:
                self._check_space(lv_size)
            elif not sparse:
                self._check_space(capacity)
            self._make_volume(meta)
            self._write_meta(meta)
        return Volume(self, meta)

    def volume(self, vol_id: str) -> Volume:
        _check_volume_id(vol_id)
        return Volume(self, self._read_meta(vol_id))

    def volumes(self) -> list[Volume]:
        """Every volume of the domain, sorted by id."""
        found = []
        for entry in sorted(os.listdir(self.volumes_dir)):
            if entry.endswith(".meta"):
                meta = _read_json(os.path.join(self.volumes_dir, entry))
                if meta is not None:
                    found.append(Volume(self, meta))
        return found

    def remove_volume(self, vol_id: str) -> None:
        _check_volume_id(vol_id)
        with self._locked():
            meta_path = self._meta_path(vol_id)
            if not os.path.exists(meta_path):
                raise VolumeNotFound(f"No volume {vol_id} in storage domain {self.name}")
            # Metadata first: a half-removed volume must not look alive.
            os.unlink(meta_path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.volumes_dir, vol_id))

    def stats(self) -> dict:
        """Space figures for the engine's storage_domain: total, available,
        used and committed (provisioned) bytes."""
        volumes = self.volumes()
        used = sum(v.actual_size() for v in volumes)
        committed = sum(v.capacity for v in volumes)
        total = self._total_size()
        available = max(0, total - used)
        if self.kind == "file":
            # The file system may run out before the domain's nominal size.
            st = os.statvfs(self.path)
            available = min(available, st.f_bavail * st.f_frsize)
        return {"total": total, "available": available, "used": used, "committed": committed}

    # Private helpers.

    def _block_allocation(self, fmt, capacity, sparse, initial_size) -> int:
        if fmt == "raw" and sparse:
            raise VolumeError(
                f"Sparse raw volumes are not supported on block storage domain {self.name}: "
                f"use qcow2 or preallocated raw"
            )
        if initial_size is not None and fmt == "raw":
            raise VolumeError(
                "Initial size is not supported for raw volumes: give it only for qcow2"
            )
        if initial_size is not None:
            max_size = _round_up(int(capacity * QCOW_OVERHEAD), self.block_extent)
            if initial_size > max_size:
                raise VolumeError(
                    f"Initial size {initial_size} is bigger than the maximum size "
                    f"{max_size} of a qcow2 volume of capacity {capacity}"
                )
        if sparse:
            if initial_size is not None:
                allocation = int(initial_size * QCOW_OVERHEAD)
            else:
                allocation = min(VOLUME_UTILIZATION_CHUNK, capacity)
        else:
            allocation = initial_size if initial_size is not None else capacity
        # vdsm asks LVM for whole MiB; LVM rounds up to whole extents.
        return _round_up(_round_up(allocation, MiB), self.block_extent)

    def _check_file_parameters(self, fmt, capacity, sparse, initial_size):
        if initial_size is None:
            return
        if fmt == "qcow2":
            raise VolumeError(
                f"Initial size is not supported for qcow2 volumes on file storage domain "
                f"{self.name}: leave it out"
            )
        if sparse:
            raise VolumeError(
                f"Initial size is not supported for sparse volumes on file storage domain "
                f"{self.name}: leave it out"
            )
        if initial_size > capacity:
            raise VolumeError(
                f"Initial size {initial_size} is out of range 0-{capacity} for volume "
                f"of capacity {capacity}"
            )

    def _check_space(self, needed):
        available = self.stats()["available"]
        if needed > available:
            raise VolumeError(
                f"Not enough free space in storage domain {self.name}: {needed} bytes "
                f"needed, {available} available"
            )

    def _total_size(self) -> int:
        if self.size is not None:
            return self.size
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize

    def _make_volume(self, meta):
        final = os.path.join(self.volumes_dir, meta["id"])
        tmp = os.path.join(self.volumes_dir, f".{meta['id']}.tmp")
        try:
            if meta["format"] == "qcow2":
                backing = []
                if meta.get("backing"):
                    # -u: the caller probed the backing; do not open it again.
                    backing = ["-u", "-b", meta["backing_file"], "-F", meta["backing_format"]]
                _run(
                    [
                        "qemu-img", "create", "-q", "-f", "qcow2",
                        "-o", f"compat={QCOW2_COMPAT}", *backing,
                        tmp, str(meta["capacity"]),
                    ]
                )  # fmt: skip
            else:
                with open(tmp, "wb"):
                    pass
            if meta["lv_size"] is not None:
                # The LV has its full size from the start, whatever it holds.
                os.truncate(tmp, meta["lv_size"])
            elif meta["format"] == "raw":
                os.truncate(tmp, meta["capacity"])
                if not meta["sparse"]:
                    _fallocate(tmp, 0, meta["capacity"])
            elif not meta["sparse"]:
                # Preallocated qcow2 on file: space after the metadata, as
                # vdsm's fallocate helper does.
                offset = _round_up(os.path.getsize(tmp), DIRECT_IO_ALIGNMENT)
                _fallocate(tmp, offset, meta["capacity"])
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _meta_path(self, vol_id) -> str:
        return os.path.join(self.volumes_dir, vol_id + ".meta")

    def _read_meta(self, vol_id) -> dict:
        meta = _read_json(self._meta_path(vol_id))
        if meta is None:
            raise VolumeNotFound(f"No volume {vol_id} in storage domain {self.name}")
        return meta

    def _write_meta(self, meta):
        _write_json(self._meta_path(meta["id"]), meta)

    @contextlib.contextmanager
    def _locked(self):
        # Serializes space accounting between engine threads and processes.
        with open(os.path.join(self.path, "dom_md", "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def check_checksum(algorithm: str, block_size: int) -> None:
    """VolumeError unless imageio's /checksum would accept these."""
    if algorithm not in hashlib.algorithms_available:
        raise VolumeError(
            f"Unsupported checksum algorithm {algorithm!r}: use one of "
            f"{', '.join(sorted(hashlib.algorithms_available))}"
        )
    if not (
        CHECKSUM_MIN_BLOCK_SIZE <= block_size <= CHECKSUM_MAX_BLOCK_SIZE
        and block_size % CHECKSUM_ALIGNMENT == 0
    ):
        raise VolumeError(
            f"Invalid checksum block size {block_size}: use a multiple of "
            f"{CHECKSUM_ALIGNMENT} between {CHECKSUM_MIN_BLOCK_SIZE} and "
            f"{CHECKSUM_MAX_BLOCK_SIZE}"
        )


def nbd_checksum(url: str, algorithm: str, block_size: int) -> dict:
    """The checksum imageio's ``/checksum`` returns for what the NBD server
    at url serves. imageio's own code computes it, so the value is the
    daemon's by construction (the lab is not shipped, so it may use
    internals)."""
    with (
        nbd_backend.open(urlparse(url), "r") as backend,
        util.aligned_buffer(block_size) as buf,
    ):
        return imageio_checksum.compute(backend, buf, algorithm=algorithm)


def check_direct_io(directory: str) -> None:
    """Raise StorageError unless files in directory can be used with O_DIRECT.

    imageio's file backend and qemu-nbd with cache=none open volumes with
    O_DIRECT, as on a host.
    """
    fd, path = tempfile.mkstemp(prefix=".direct-io-", dir=directory)
    os.close(fd)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            raise StorageError(
                f"Directory {directory} does not support direct I/O (O_DIRECT: {e.strerror}), "
                f"which imageio's file backend and qemu-nbd need: put the lab directory "
                f"on a file system that supports it, such as ext4 or xfs"
            ) from None
        try:
            # Opening may succeed where aligned I/O still fails.
            with mmap.mmap(-1, DIRECT_IO_ALIGNMENT) as buf:
                os.write(fd, buf)
        except OSError as e:
            raise StorageError(
                f"Directory {directory} accepts O_DIRECT but direct writes fail "
                f"({e.strerror}): put the lab directory on a file system such as ext4 or xfs"
            ) from None
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


def _create_domain(path, meta_path, name, kind, dom_id, size) -> dict:
    if dom_id is None:
        dom_id = str(uuid.uuid4())
    else:
        _check_uuid("storage domain id", dom_id)
    if size is None and kind == "block":
        size = DEFAULT_BLOCK_DOMAIN_SIZE
    os.makedirs(os.path.join(path, "dom_md"), exist_ok=True)
    os.makedirs(os.path.join(path, "volumes"), exist_ok=True)
    check_direct_io(os.path.join(path, "volumes"))
    meta = {"id": dom_id, "name": name, "kind": kind, "size": size}
    _write_json(meta_path, meta)
    return meta


def _check_volume_id(vol_id):
    if not isinstance(vol_id, str) or not _NAME.match(vol_id) or vol_id.endswith(".meta"):
        raise VolumeError(
            f"Invalid volume id {vol_id!r}: use a UUID or letters, digits, '_', '.', '-'"
        )


def _check_uuid(what, value):
    try:
        uuid.UUID(value)
    except (TypeError, ValueError):
        raise StorageError(f"Invalid {what} {value!r}: use a UUID") from None


def _positive_int(what, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise VolumeError(f"Invalid {what} {value!r}: use a positive number of bytes")
    return value


def _round_up(n, step) -> int:
    return (n + step - 1) // step * step


def _fallocate(path, offset, length):
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        raise VolumeError(f"Cannot preallocate {length} bytes for {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _qemu_img_info(filename) -> dict:
    out = _run(["qemu-img", "info", "--output", "json", filename])
    return json.loads(out)


def _run(cmd) -> str:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        raise StorageError(f"{cmd[0]} not found: install qemu-utils") from None
    if proc.returncode != 0:
        raise VolumeError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StorageError(f"Corrupt metadata {path}: {e}") from None


def _write_json(path, data):
    fd, tmp = tempfile.mkstemp(prefix=".meta-", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
