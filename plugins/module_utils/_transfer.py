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
import traceback

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _checksum,
    _copy,
    _engine,
    _image,
    _imageio,
    _nbd,
    _plan,
    _progress,
    _qemu,
)

MiB = 1024**2


class TransferError(Exception):
    """The upload or download failed; what was made has been undone."""


# What a failed transfer raises; each says what went wrong in its message.
FAILURES = (
    TransferError,
    _engine.EngineError,
    _plan.PlanError,
    _qemu.QemuError,
    _nbd.Error,
    _imageio.Error,
    _copy.CopyError,
    ValueError,
)


def run_module(module, action, description):
    """Run upload or download for a module and exit with its result."""
    if _engine.SDK_IMPORT_ERROR:
        module.fail_json(
            msg=missing_required_lib("ovirt-engine-sdk-python"),
            exception=_engine.SDK_IMPORT_ERROR,
        )
    params = module.params
    if not 1 <= params["max_workers"] <= 8:
        module.fail_json(msg="max_workers must be between 1 and 8")
    if not 64 * 1024 <= params["buffer_size"] <= 32 * MiB:
        module.fail_json(msg="buffer_size must be between 64 KiB and 32 MiB")
    progress = _progress.Progress(params["progress_file"], description=description)
    engine = None
    try:
        engine = _engine.Engine(
            params["auth"], timeout=params["timeout"], poll_interval=params["poll_interval"]
        )
        options = dict(
            params,
            ca_file=params["auth"].get("ca_file"),
            insecure=params["auth"].get("insecure"),
            workers=params["max_workers"],
            request_size=params["buffer_size"],
        )
        if params["transfer_host"]:
            options["host_id"] = engine.host_by_name(params["transfer_host"]).id
        result = action(engine, options, progress, check_mode=module.check_mode)
    except FAILURES as e:
        module.fail_json(msg=str(e), exception=traceback.format_exc())
    finally:
        if engine is not None:
            engine.close()
        progress.remove()
    module.exit_json(**result)


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
    """An image transfer of one disk and the imageio endpoint reaching it."""

    def __init__(self, engine, options, disk_id, direction, snapshot_id=None, is_zero=False):
        self.engine = engine
        self.options = options
        self.disk_id = disk_id
        self.transfer = engine.start_transfer(
            disk_id=disk_id,
            snapshot_id=snapshot_id,
            direction=direction,
            inactivity_timeout=options.get("inactivity_timeout"),
            timeout_policy=options.get("timeout_policy", "cancel"),
            host_id=options.get("host_id"),
        )
        try:
            self.endpoint = _open_imageio(self.transfer, options, is_zero)
        except BaseException:
            self.abort(direction)
            raise

    def abort(self, direction):
        """Undo: cancel an upload (the engine drops what it wrote), finalize a download."""
        if direction == "upload":
            self.engine.cancel_transfer(self.transfer.id)
        else:
            self.engine.finalize_transfer(self.transfer.id, self.disk_id)

    def close(self):
        self.endpoint.close()


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
    )


def transfer_result(stats, endpoint):
    result = stats.as_dict()
    result["endpoint"] = endpoint.used
    result["url"] = endpoint.url
    return result


def checksum_disk(engine, disk_id, options, snapshot_id=None):
    """The imageio checksum of a disk, through a short download transfer."""
    session = _Session(engine, options, disk_id, "download", snapshot_id=snapshot_id)
    try:
        return session.endpoint.checksum()
    finally:
        session.close()
        engine.finalize_transfer(session.transfer.id, disk_id)


def upload(engine, options, progress, check_mode=False):
    """Upload options["image"] to a new or existing disk; return the module result."""
    image = options["image"]
    progress.set_phase("inspecting")
    facts = _image.inspect(image, fmt=options.get("image_format"))
    name = options.get("name") or _default_name(image)
    disk = engine.disk(
        disk_id=options.get("disk_id"), name=None if options.get("disk_id") else name
    )
    if disk is not None:
        return _upload_existing(engine, options, progress, facts, disk, check_mode)

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
    except BaseException:
        engine.remove_disk(disk.id)
        raise
    stats = _send(engine, session, image, facts, options, progress)
    disk = engine.get_disk(disk.id)
    result["disk"] = disk_result(disk, sd.name)
    result["transfer"] = stats
    return result


def _upload_existing(engine, options, progress, facts, disk, check_mode):
    name = disk.alias or disk.name
    if facts["virtual_size"] > disk.provisioned_size:
        raise TransferError(
            f"the image is {facts['virtual_size']} bytes but disk {name} ({disk.id}) holds only "
            f"{disk.provisioned_size} bytes; extend the disk or upload to a new one"
        )
    result = {"changed": True, "plan": {"disk_id": disk.id, "name": name, "existing": True}}
    if not options.get("force"):
        progress.set_phase("comparing checksums")
        with _image.open_endpoint(options["image"], facts["format"]) as src:
            source_sum = _checksum.checksum(src)
        if checksum_disk(engine, disk.id, options) == source_sum:
            result["changed"] = False
            result["disk"] = disk_result(disk, _domain_name(engine, disk))
            return result
    if check_mode:
        return result
    session = _Session(engine, options, disk.id, "upload", is_zero=False)
    stats = _send(engine, session, options["image"], facts, options, progress, existing=True)
    result["disk"] = disk_result(engine.get_disk(disk.id), _domain_name(engine, disk))
    result["transfer"] = stats
    return result


def _send(engine, session, image, facts, options, progress, existing=False):
    """Copy the image into the transfer, verify, finalize; undo on failure."""
    try:
        with _image.open_endpoint(image, facts["format"]) as src:
            dst = session.endpoint
            if dst.size < src.size:
                raise TransferError(
                    f"the image is {src.size} bytes but the disk holds only {dst.size} bytes"
                )
            progress.set_phase("uploading", size=src.size)
            stats = _copy.copy(
                src,
                dst,
                workers=options.get("workers", _copy.DEFAULT_WORKERS),
                request_size=options.get("request_size", _copy.DEFAULT_REQUEST_SIZE),
                progress=progress.update,
            )
            if options.get("verify"):
                progress.set_phase("verifying")
                _verify(src, dst)
        session.close()
    except BaseException:
        session.close()
        if existing:
            # Cancelling would make the engine delete the user's disk; keep it.
            engine.finalize_transfer(session.transfer.id, session.disk_id)
        else:
            session.abort("upload")
        raise
    progress.set_phase("finalizing")
    try:
        engine.finalize_transfer(session.transfer.id, session.disk_id)
    except _engine.EngineError as e:
        raise TransferError(str(e)) from e
    result = transfer_result(stats, session.endpoint)
    progress.set_phase("done")
    return result


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
    sd_name = _domain_name(engine, disk)
    result = {"changed": True, "disk": disk_result(disk, sd_name), "dest": dest, "format": fmt}

    if os.path.exists(dest) and not options.get("force"):
        progress.set_phase("comparing checksums")
        with _image.open_endpoint(dest, None) as local:
            local_sum = _checksum.checksum(local)
        if checksum_disk(engine, disk.id, options, snapshot_id=snapshot_id) == local_sum:
            result["changed"] = False
            return result
    if check_mode:
        return result

    session = _Session(engine, options, disk.id, "download", snapshot_id=snapshot_id)
    tmp = None
    try:
        src = session.endpoint
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".part"
        )
        os.close(fd)
        with _image.create_endpoint(tmp, fmt, src.size) as dst:
            progress.set_phase("downloading", size=src.size)
            stats = _copy.copy(
                src,
                dst,
                workers=options.get("workers", _copy.DEFAULT_WORKERS),
                request_size=options.get("request_size", _copy.DEFAULT_REQUEST_SIZE),
                progress=progress.update,
            )
            if options.get("verify"):
                progress.set_phase("verifying")
                _verify(dst, src)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        tmp = None
        result["transfer"] = transfer_result(stats, src)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        session.close()
        progress.set_phase("finalizing")
        engine.finalize_transfer(session.transfer.id, disk.id)
    progress.set_phase("done")
    return result


def _domain_name(engine, disk):
    if not disk.storage_domains:
        return None
    sd = disk.storage_domains[0]
    return sd.name or engine.storage_domain_by_id(sd.id).name


def _default_name(image):
    if _qemu.is_nbd_url(image):
        raise TransferError("give name for a disk uploaded from an NBD URL")
    base = os.path.basename(image)
    return os.path.splitext(base)[0] or base
