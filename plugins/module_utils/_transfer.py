# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Upload an image to an oVirt disk, download a disk to an image.

The orchestration behind the disk_upload and disk_download modules: plan,
create, transfer, verify, finalize, and undo on failure, so that a failure
leaves no locked disk, no open transfer, no qemu-nbd and no partial file.
"""

from __future__ import annotations

import os
import tempfile

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _checksum,
    _copy,
    _engine,
    _image,
    _imageio,
    _imageio_http,
    _nbd,
    _plan,
    _progress,
    _qemu_img,
    _signals,
    _stale,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import MiB

# HTTP status of a failure inside imageio (RFC 9110 15.6.1).
INTERNAL_SERVER_ERROR = 500


class TransferError(Exception):
    """The upload or download failed; what was made has been undone."""


# What a failed transfer raises; each says what went wrong in its message.
FAILURES = (
    TransferError,
    _engine.EngineError,
    _plan.PlanError,
    _qemu_img.QemuError,
    _nbd.Error,
    _imageio.Error,
    _copy.CopyError,
    ValueError,
)


def run_module(module, action, description):
    """Run upload or download for a module and exit with its result."""
    params = module.params
    if not 1 <= params["max_workers"] <= 8:
        module.fail_json(msg="max_workers must be between 1 and 8")
    if not 64 * 1024 <= params["buffer_size"] <= 32 * MiB:
        module.fail_json(msg="buffer_size must be between 64 KiB and 32 MiB")
    progress = _progress.Progress(params["progress_file"], description=description)
    # The whole operation's deadline: the copy gives up when it passes.
    deadline = _engine.Deadline(params["timeout"], params["poll_interval"])

    def work(engine):
        options = dict(
            params,
            ca_file=params["auth"].get("ca_file"),
            insecure=params["auth"].get("insecure"),
            workers=params["max_workers"],
            request_size=params["buffer_size"],
            deadline=deadline,
        )
        if params["transfer_host"]:
            options["host_id"] = engine.host_by_name(params["transfer_host"]).id
        stale = [] if module.check_mode else _stale.end_stale(engine)
        result = action(engine, options, progress, check_mode=module.check_mode)
        if stale:
            result["stale_transfers"] = stale
        if engine.retries:
            result["engine_retries"] = engine.retries
        return result

    _engine.run_module(
        module,
        work,
        failures=FAILURES,
        stopped="{}; what the module had started was undone",
        cleanup=progress.remove,
    )


def disk_result(disk, storage_domain=None):
    """The disk as the modules return it."""
    return {
        "id": disk.id,
        "name": disk.alias or disk.name,
        "description": disk.description,
        "format": str(disk.format) if disk.format else None,
        "sparse": disk.sparse,
        "provisioned_size": disk.provisioned_size,
        "actual_size": disk.actual_size,
        "content_type": str(disk.content_type) if disk.content_type else None,
        "backup": str(disk.backup) if disk.backup else None,
        "status": str(disk.status) if disk.status else None,
        "storage_domain": storage_domain,
    }


class _Session:
    """An image transfer of one disk and the imageio endpoint reaching it.

    Used as a context manager: a block that ends well finalizes the
    transfer; one that fails undoes it (see _engine.Engine.undo_transfer),
    cancelling the upload to a new disk and finalizing anything else, so a
    disk the user made (keep_disk) is never removed.
    """

    def __init__(
        self,
        engine,
        options,
        disk_id,
        direction,
        snapshot_id=None,
        is_zero=False,
        keep_disk=False,
    ):
        self.engine = engine
        self.disk_id = disk_id
        self.direction = direction
        self.keep_disk = keep_disk
        self.transfer = engine.start_transfer(
            disk_id=disk_id,
            snapshot_id=snapshot_id,
            direction=direction,
            inactivity_timeout=options.get("inactivity_timeout"),
            timeout_policy=options.get("timeout_policy", "cancel"),
            host_id=options.get("host_id"),
            keep_disk=keep_disk,
        )
        self.record = _stale.Record(engine.url, self.transfer.id, disk_id, direction, keep_disk)
        try:
            self.record.save()
            self.endpoint = _open_imageio(self.transfer, options, is_zero)
        except BaseException as e:
            _undo(e, self._abort)
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.endpoint.close()
        if exc is None:
            self.engine.finalize_transfer(self.transfer.id, self.disk_id, direction=self.direction)
            self.record.remove()
        else:
            _undo(exc, self._abort)

    def result(self, stats):
        """What moved, and how imageio was reached, for the module result."""
        result = stats.as_dict()
        endpoint = self.endpoint
        # With proxy=always the proxy is the only URL the endpoint knows.
        proxy = endpoint.url == self.transfer.proxy_url
        result["endpoint"] = _imageio_http.USED_PROXY if proxy else endpoint.used
        result["url"] = endpoint.url
        result["retries"] = endpoint.retries
        return result

    def _abort(self):
        self.engine.undo_transfer(
            self.transfer.id, self.direction, self.disk_id, keep_disk=self.keep_disk
        )
        self.record.remove()


def _undo(error, undo):
    """Run undo() while error is on its way up; a failed undo joins its message."""
    try:
        undo()
    except FAILURES as e:
        raise TransferError(f"{error}; then undoing it failed: {e}") from error


def _open_imageio(transfer, options, is_zero):
    proxy = options.get("proxy", "auto")
    transfer_url = transfer.transfer_url
    proxy_url = transfer.proxy_url
    if proxy == "always":
        transfer_url, proxy_url = proxy_url, None
    elif proxy == "never":
        proxy_url = None
    if not transfer_url:
        raise TransferError(f"the engine gave transfer {transfer.id} no URL to reach imageio")
    return _imageio.ImageioEndpoint(
        transfer_url,
        proxy_url=proxy_url,
        ca_file=options.get("ca_file"),
        insecure=options.get("insecure", False),
        is_zero=is_zero,
        retry_timeout=options.get("retry_timeout", _imageio.RETRY_TIMEOUT),
    )


class _ZeroPadded:
    """An image read as size bytes: its own bytes, then zeros.

    A disk may be larger than the image put on it: an existing disk, or a raw
    disk on block storage, whose size is whole extents. Its guest then sees
    the image followed by zeros, and so must the copy and the checksums.
    """

    def __init__(self, endpoint, size):
        self._endpoint = endpoint
        self.size = size
        self.is_zero = endpoint.is_zero
        self.max_connections = endpoint.max_connections
        self.max_request = endpoint.max_request

    def clone(self):
        return _ZeroPadded(self._endpoint.clone(), self.size)

    def extents(self, offset=0, length=None):
        end = self.size if length is None else offset + length
        image_end = self._endpoint.size
        if offset < image_end:
            yield from self._endpoint.extents(offset, min(end, image_end) - offset)
        start = max(offset, image_end)
        if start < end:
            yield _copy.Extent(start, end - start, True, True)

    def readinto(self, offset, buf):
        # Only data extents are read, and all of them lie in the image.
        self._endpoint.readinto(offset, buf)

    def close(self):
        self._endpoint.close()


def checksum_disk(engine, disk_id, options, snapshot_id=None):
    """The imageio checksum of a disk, through a short download transfer."""
    with _Session(engine, options, disk_id, "download", snapshot_id=snapshot_id) as session:
        return session.endpoint.checksum()


def upload(engine, options, progress, check_mode=False):
    """Upload options["image"] to a new or existing disk; return the module result.

    The image is opened once: what is planned from its facts is what is sent.
    imageio sets an upload's pace, so the image is read with direct I/O,
    leaving the CPU to TLS instead of copying from the page cache.
    """
    progress.set_phase("inspecting")
    with _image.open_source(
        options["image"], fmt=options.get("image_format"), page_cache=False
    ) as source:
        return _upload(engine, options, progress, source, check_mode)


def _upload(engine, options, progress, source, check_mode):
    facts = source.facts()
    name = options.get("name") or _default_name(source.image)
    disk = engine.disk(
        disk_id=options.get("disk_id"), name=None if options.get("disk_id") else name
    )
    if disk is not None:
        return _upload_existing(engine, options, progress, source, facts, disk, check_mode)

    if not options.get("storage_domain"):
        raise TransferError(
            "disk {} does not exist; give storage_domain to create it".format(
                options.get("disk_id") or options.get("name")
            )
        )
    sd = engine.storage_domain(options["storage_domain"])
    storage_type = str(sd.storage.type) if sd.storage is not None else "nfs"
    spec = _plan.disk_spec(
        facts,
        storage_type,
        storage_domain=f"storage domain {sd.name}",
        disk_format=options.get("format"),
        preallocated=options.get("preallocated", False),
        backup=options.get("backup"),
        content_type=options.get("content_type", "auto"),
    )
    result = {"changed": True, "plan": dict(spec, name=name, storage_domain=sd.name)}
    if check_mode:
        return result

    full_volume = None
    if "initial_size" in spec and storage_type in _plan.BLOCK_STORAGE_TYPES:
        full_volume = (
            f"the volume of disk {name} on block storage domain {sd.name} has room for the "
            f"{spec['initial_size']} bytes qemu-img measure gives for the image, and does not "
            "grow during an upload: did the image change after it was measured?"
        )
    progress.set_phase("creating disk")
    disk = engine.create_disk(
        spec,
        sd.name,
        name,
        description=options.get("description"),
        disk_id=options.get("disk_id"),
    )
    # A new qcow2 or sparse disk reads as zeros: zero extents need no writes.
    is_zero = spec["format"] == "cow" or spec["sparse"]
    try:
        session = _Session(engine, options, disk.id, "upload", is_zero=is_zero)
    except BaseException as e:
        _undo(e, lambda: engine.remove_disk(disk.id))
        raise
    stats = _send(session, source.endpoint, options, progress, full_volume)
    result["disk"] = disk_result(engine.get_disk(disk.id), sd.name)
    result["transfer"] = stats
    return result


def _upload_existing(engine, options, progress, source, facts, disk, check_mode):
    name = disk.alias or disk.name
    if facts["virtual_size"] > disk.provisioned_size:
        raise TransferError(
            f"the image is {facts['virtual_size']} bytes but disk {name} ({disk.id}) holds only "
            f"{disk.provisioned_size} bytes; extend the disk or upload to a new one"
        )
    sd = engine.disk_domain(disk)
    result = {"changed": True, "plan": {"disk_id": disk.id, "name": name, "existing": True}}
    if not options.get("force"):
        progress.set_phase("comparing checksums")
        source_sum = _checksum.checksum(_ZeroPadded(source.endpoint, disk.provisioned_size))
        if checksum_disk(engine, disk.id, options) == source_sum:
            result["changed"] = False
            result["disk"] = disk_result(disk, sd.name if sd else None)
            return result
    if check_mode:
        return result
    session = _Session(engine, options, disk.id, "upload", is_zero=False, keep_disk=True)
    stats = _send(
        session,
        source.endpoint,
        options,
        progress,
        _full_volume(disk, sd, facts["measure"]["qcow2"]["required"]),
    )
    result["disk"] = disk_result(engine.get_disk(disk.id), sd.name if sd else None)
    result["transfer"] = stats
    return result


def _full_volume(disk, sd, required):
    """Why an existing disk may be too small for the image on block storage."""
    block = sd is not None and sd.storage is not None
    block = block and str(sd.storage.type) in _plan.BLOCK_STORAGE_TYPES
    cow = disk.format is not None and str(disk.format) == "cow"
    if not (block and cow and disk.sparse and disk.actual_size is not None):
        return None
    if disk.actual_size >= required:
        return None
    return (
        f"disk {disk.alias or disk.name} ({disk.id}) is a sparse qcow2 disk on block storage "
        f"domain {sd.name}, whose volume has room for {disk.actual_size} bytes and does not grow "
        f"during an upload, but the image needs up to {required} bytes (qemu-img measure); "
        "upload it to a new disk, which gets a volume of that size"
    )


def _send(session, src, options, progress, full_volume=None):
    """Copy the source endpoint into the transfer, verify, finalize; undo on
    failure.

    full_volume: what to tell when imageio fails to write, if the disk's
    volume may be full.
    """
    with session:
        dst = session.endpoint
        if dst.size < src.size:
            raise TransferError(
                f"the image is {src.size} bytes but the disk holds only {dst.size} bytes"
            )
        if dst.size > src.size:
            src = _ZeroPadded(src, dst.size)
        progress.set_phase("uploading", size=src.size)
        try:
            stats = _copy_data(src, dst, options, progress)
        except _imageio.Error as e:
            # imageio says no more than "Server failed" when a volume is full.
            if e.status == INTERNAL_SERVER_ERROR and full_volume:
                raise TransferError(
                    f"{e}; imageio answers so when the volume is full: {full_volume}"
                ) from e
            raise
        if options.get("verify"):
            progress.set_phase("verifying")
            _verify(src, dst)
        progress.set_phase("finalizing")
    progress.set_phase("done")
    return session.result(stats)


def _copy_data(src, dst, options, progress):
    deadline = options.get("deadline")
    heartbeat = None
    if options.get("heartbeat_file"):
        heartbeat = _signals.Heartbeat(options["heartbeat_file"], options["heartbeat_timeout"])

    def update(stats):
        progress.update(stats)
        if heartbeat is not None:
            heartbeat.check()
        if deadline is not None and deadline.expired():
            raise TransferError(
                f"gave up after the timeout of {options['timeout']} s with {stats.done} of "
                f"{stats.size} bytes copied; give a larger timeout for this image"
            )

    return _copy.copy(
        src,
        dst,
        workers=options.get("workers", _copy.DEFAULT_WORKERS),
        request_size=options.get("request_size", _copy.DEFAULT_REQUEST_SIZE),
        progress=update,
    )


def _verify(local, disk):
    """Compare a local endpoint's checksum with the one imageio computes for the disk."""
    ours = _checksum.checksum(local)
    theirs = disk.checksum(algorithm=ours["algorithm"], block_size=ours["block_size"])
    if ours["checksum"] != theirs["checksum"]:
        raise TransferError(
            "verification failed: the disk's checksum {} differs from the image's {}".format(
                theirs["checksum"], ours["checksum"]
            )
        )


def download(engine, options, progress, check_mode=False):
    """Download a disk (or snapshot) to options["dest"]; return the module result."""
    disk = engine.disk(disk_id=options.get("disk_id"), name=options.get("name"))
    if disk is None:
        raise TransferError(
            "disk {} not found".format(options.get("disk_id") or options.get("name"))
        )
    dest = os.path.abspath(options["dest"])
    directory = os.path.dirname(dest)
    if not os.path.isdir(directory):
        raise TransferError(f"cannot write {dest}: directory {directory} does not exist")
    if os.path.isdir(dest):
        raise TransferError(f"cannot write {dest}: it is a directory")
    fmt = options.get("format", "qcow2")
    snapshot_id = options.get("snapshot_id")
    sd = engine.disk_domain(disk)
    result = {
        "changed": True,
        "disk": disk_result(disk, sd.name if sd else None),
        "dest": dest,
        "format": fmt,
    }

    if os.path.exists(dest) and not options.get("force"):
        progress.set_phase("comparing checksums")
        with _image.open_endpoint(dest, None) as local:
            local_sum = _checksum.checksum(local)
        if checksum_disk(engine, disk.id, options, snapshot_id=snapshot_id) == local_sum:
            result["changed"] = False
            return result
    if check_mode:
        return result

    # The image is written beside dest and takes its name only when the
    # transfer has been finalized, so dest is never half written.
    try:
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".part"
        )
    except OSError as e:
        raise TransferError(f"cannot write {dest}: {e.strerror}") from e
    os.close(fd)
    try:
        with _Session(engine, options, disk.id, "download", snapshot_id=snapshot_id) as session:
            src = session.endpoint
            with _image.create_endpoint(tmp, fmt, src.size) as dst:
                progress.set_phase("downloading", size=src.size)
                stats = _copy_data(src, dst, options, progress)
                if options.get("verify"):
                    progress.set_phase("verifying")
                    _verify(dst, src)
            progress.set_phase("finalizing")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, FAILURES) and tmp in str(e):
            # The user knows the file by its name, not by the temporary one.
            raise TransferError(str(e).replace(tmp, dest)) from e
        raise
    result["transfer"] = session.result(stats)
    progress.set_phase("done")
    return result


def _default_name(image):
    if _qemu_img.is_nbd_url(image):
        raise TransferError("give name for a disk uploaded from an NBD URL")
    base = os.path.basename(image)
    return os.path.splitext(base)[0] or base
