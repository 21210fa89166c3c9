# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The engine side of disk work, through ovirtsdk4.

Connection from the shared ``auth`` options, lookups by id or name, and the
lifecycles of disks, image transfers and disk moves, each waited on with a
monotonic deadline and a poll that starts short and backs off. Engine calls
that fail with 409 (locked, busy) or 5xx are retried with backoff; the
transfer phase rules are the ones ovirt-img and the SDK examples follow, and
moves are followed through their jobs by correlation id, as the SDK's jobs
helper does.
"""

from __future__ import annotations

import contextlib
import time
import traceback
import uuid

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.thinair.ovirt.plugins.module_utils import _signals

try:
    import ovirtsdk4 as sdk
    import pycurl
    from ovirtsdk4 import types
except ImportError:
    sdk = None
    types = None
    SDK_IMPORT_ERROR = traceback.format_exc()
    LOST_CONNECTION_ERRORS = ()
else:
    SDK_IMPORT_ERROR = None
    # libcurl's errors for a request sent and never answered: an empty
    # reply, a connection reset while sending or receiving.
    LOST_CONNECTION_ERRORS = (pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR)

# Waiting starts with this pause and grows by BACKOFF up to the poll interval.
FIRST_POLL = 0.05
BACKOFF = 1.5

# Engine answers worth another try: locked or busy objects, engine trouble.
RETRY_STATUS = (409, 500, 502, 503, 504)
RETRIES = 5

# Phases of a transfer nobody has finalized or cancelled yet.
_TRANSFER_OPEN = frozenset(
    ("initializing", "transferring", "resuming", "paused_system", "paused_user", "unknown")
)


class EngineError(Exception):
    """An engine operation failed; the message says what and why."""


class JobFailed(EngineError):
    """The engine's job for an operation ended failed or aborted."""


class Deadline:
    """A monotonic deadline with a poll that backs off."""

    def __init__(self, timeout, poll_interval):
        self.end = time.monotonic() + timeout
        self.poll_interval = poll_interval
        self._pause = min(FIRST_POLL, poll_interval)

    def left(self):
        return self.end - time.monotonic()

    def expired(self):
        return self.left() <= 0

    def sleep(self):
        time.sleep(max(0.0, min(self._pause, self.left())))
        self._pause = min(self._pause * BACKOFF, self.poll_interval)


def engine_url(auth):
    if auth.get("url"):
        return auth["url"]
    if auth.get("hostname"):
        return "https://{}/ovirt-engine/api".format(auth["hostname"])
    raise EngineError(
        "no engine to connect to: give auth.url or auth.hostname, or set OVIRT_URL or "
        "OVIRT_HOSTNAME in the environment"
    )


def _connection_lost(e):
    """Whether an SDK error is a request sent whose answer never came (the
    engine or a proxy in front of it went away meanwhile)."""
    cause = e.__cause__ or e.__context__
    return isinstance(cause, pycurl.error) and cause.args[0] in LOST_CONNECTION_ERRORS


def fault_text(e):
    """The engine's own words from an SDK error, without the SDK's wrapping."""
    fault = getattr(e, "fault", None)
    if fault is not None and (fault.detail or fault.reason):
        return (fault.detail or fault.reason).strip()
    return str(e)


def run_module(module, work, failures=None, stopped="{} before it finished", cleanup=None):
    """Run work(engine) for a module, logged in with the module's auth,
    timeout and poll_interval, and exit with the result it returns.

    failures: the errors that fail the module with their message
        (EngineError by default). stopped: the message of a module stopped
        by a signal, {} being the signal. cleanup: called at the end in any
        case, after the session ends.
    """
    if SDK_IMPORT_ERROR:
        module.fail_json(
            msg=missing_required_lib("ovirt-engine-sdk-python"), exception=SDK_IMPORT_ERROR
        )
    params = module.params
    failures = failures or EngineError
    engine = None
    with _signals.stop_on_signals():
        try:
            engine = Engine(params["auth"], timeout=params["timeout"],
                            poll_interval=params["poll_interval"])  # fmt: skip
            result = work(engine)
        except _signals.Stopped as e:
            module.fail_json(msg=stopped.format(e))
        except failures as e:
            module.fail_json(msg=str(e), exception=traceback.format_exc())
        finally:
            if engine is not None:
                engine.close()
            if cleanup is not None:
                cleanup()
    module.exit_json(**result)


class Engine:
    """One logged-in session with the engine."""

    def __init__(self, auth, timeout=3600, poll_interval=1.0):
        self.url = engine_url(auth)
        self.timeout = timeout
        self.poll_interval = poll_interval
        has_password = auth.get("username") and auth.get("password")
        if not (has_password or auth.get("token") or auth.get("kerberos")):
            raise EngineError(
                "no credentials for the engine: give auth.username and auth.password, "
                "auth.token or auth.kerberos: true, or set OVIRT_USERNAME and OVIRT_PASSWORD "
                "(or OVIRT_TOKEN) in the environment"
            )
        self.connection = sdk.Connection(
            url=self.url,
            username=auth.get("username"),
            password=auth.get("password"),
            token=auth.get("token"),
            ca_file=auth.get("ca_file"),
            insecure=auth.get("insecure", False),
            timeout=auth.get("timeout") or 0,
            compress=auth.get("compress", True),
            kerberos=auth.get("kerberos", False),
            headers=auth.get("headers"),
        )
        self._owns_token = not auth.get("token")
        self.system = self.connection.system_service()
        # What had to be sent again, one line each, for the module result.
        self.retries = []
        # An engine that cannot be reached at first is more likely a wrong
        # URL than a restart: no waiting for it before it answered once.
        self._answered = False
        self.call(self.connection.test, raise_exception=True, what="connect to the engine")
        self._answered = True

    def close(self):
        with contextlib.suppress(sdk.Error):
            self.connection.close(logout=self._owns_token)

    def deadline(self, timeout=None):
        return Deadline(self.timeout if timeout is None else timeout, self.poll_interval)

    def call(self, func, *args, what="call the engine", retry=True, taken=None, **kwargs):
        """Call an SDK function and turn its errors into EngineError.

        A call that could not connect (once the engine has answered) never
        reached it: it is sent again, as is one answered 409 or 5xx, or
        whose connection was lost, when retry. An action that may have been
        carried out although its answer was lost (5xx, connection lost)
        gives taken(), which reads the state: when it says the action was
        taken, the call is not sent again.
        """
        pause = 0.5
        for attempt in range(RETRIES + 1):
            try:
                return func(*args, **kwargs)
            except sdk.AuthError as e:
                raise EngineError(
                    f"cannot {what}: authentication failed at {self.url}: {fault_text(e)}"
                ) from e
            except sdk.NotFoundError:
                raise
            except sdk.Error as e:
                code = getattr(e, "code", None)
                unsent = isinstance(e, sdk.ConnectionError) and self._answered
                # The engine may have carried the request out.
                unknown = _connection_lost(e) or (code is not None and code >= 500)
                again = (
                    unsent
                    or (retry and (code in RETRY_STATUS or unknown))
                    or (taken is not None and unknown)
                )
                if again and attempt < RETRIES:
                    time.sleep(pause)
                    pause *= 2
                    if taken is not None and unknown and self._taken(taken):
                        self.retries.append(
                            f"{what}: {self._explain(e)}; the engine had done it, not sent again"
                        )
                        return None
                    self.retries.append(f"{what}: {self._explain(e)}; sent again")
                    continue
                raise EngineError(f"cannot {what}: {self._explain(e)}") from e
        raise AssertionError("unreachable")

    def _taken(self, taken):
        """Whether taken() says an action went through; unknown is no."""
        try:
            return taken()
        except sdk.Error:
            return False

    def _explain(self, e):
        text = fault_text(e)
        # libcurl's words for CURLE_PEER_FAILED_VERIFICATION vary by version.
        if "SSL certificate" in text or "certificate verify failed" in text:
            return (
                f"the certificate of {self.url} is not trusted ({text}); set auth.ca_file to "
                "the engine's CA (https://ENGINE/ovirt-engine/services/pki-resource"
                "?resource=ca-certificate&format=X509-PEM-CA)"
            )
        if "Couldn't connect" in text or "Could not resolve" in text or "Failed to connect" in text:
            return f"the engine at {self.url} cannot be reached ({text})"
        return text

    # Lookups

    def storage_domain(self, name):
        service = self.system.storage_domains_service()
        found = self.call(
            service.list, search=f'name="{name}"', what=f"look up storage domain {name}"
        )
        found = [sd for sd in found if sd.name == name]
        if not found:
            names = sorted(sd.name for sd in self.call(service.list, what="list storage domains"))
            raise EngineError(
                "storage domain '{}' not found; the engine has: {}".format(
                    name, ", ".join(names) or "none"
                )
            )
        return found[0]

    def storage_domain_by_id(self, sd_id):
        service = self.system.storage_domains_service().storage_domain_service(sd_id)
        return self.call(service.get, what=f"look up storage domain {sd_id}")

    def disk_domain(self, disk):
        """The storage domain a disk is on, or None for a disk on none."""
        if not disk.storage_domains:
            return None
        return self.storage_domain_by_id(disk.storage_domains[0].id)

    def disk_domain_name(self, disk):
        domain = self.disk_domain(disk)
        return domain.name if domain is not None else None

    def disk(self, disk_id=None, name=None):
        """The disk with this id, or the one disk with this name; None if there is none."""
        service = self.system.disks_service()
        if disk_id:
            try:
                return self.call(service.disk_service(disk_id).get, what=f"look up disk {disk_id}")
            except sdk.NotFoundError:
                return None
        found = self.call(service.list, search=f'name="{name}"', what=f"look up disk {name}")
        found = [d for d in found if d.alias == name or d.name == name]
        if len(found) > 1:
            raise EngineError(
                "{} disks are named '{}' ({}); give disk_id".format(
                    len(found), name, ", ".join(d.id for d in found)
                )
            )
        return found[0] if found else None

    def get_disk(self, disk_id):
        """The disk, or None once the engine has removed it."""
        try:
            return self.call(
                self.system.disks_service().disk_service(disk_id).get,
                what=f"look up disk {disk_id}",
            )
        except sdk.NotFoundError:
            return None

    # Disks

    def create_disk(
        self, spec, storage_domain, name, description=None, disk_id=None, external_disk=None
    ):
        """Create a disk from a _plan spec and wait until it is OK; return it.

        external_disk, a URL or path, asks for a disk whose data comes from
        there (Disk.external_disk); engines that do not implement it create
        an ordinary empty disk and do not return the field."""
        disk = types.Disk(
            id=disk_id,
            name=name,
            alias=name,
            description=description,
            format=types.DiskFormat(spec["format"]),
            sparse=spec["sparse"],
            provisioned_size=spec["provisioned_size"],
            initial_size=spec.get("initial_size"),
            backup=types.DiskBackup(spec["backup"]),
            content_type=types.DiskContentType(spec["content_type"]),
            storage_domains=[types.StorageDomain(name=storage_domain)],
            external_disk=external_disk,
        )
        created = self.call(
            self.system.disks_service().add,
            disk,
            query={"correlation_id": str(uuid.uuid4())},
            what=f"create disk {name} on {storage_domain}",
            retry=False,
        )
        return self.wait_disk_ok(created.id, what=f"create disk {name}")

    def wait_disk_ok(self, disk_id, what="wait for the disk", timeout=None):
        deadline = self.deadline(timeout)
        while True:
            disk = self.get_disk(disk_id)
            if disk is None:
                raise EngineError(f"cannot {what}: the engine removed disk {disk_id}")
            if disk.status == types.DiskStatus.OK:
                return disk
            if disk.status == types.DiskStatus.ILLEGAL:
                raise EngineError(f"cannot {what}: disk {disk_id} became illegal")
            if deadline.expired():
                raise EngineError(
                    f"cannot {what}: disk {disk_id} is still {disk.status} after "
                    f"{self.timeout if timeout is None else timeout} s"
                )
            deadline.sleep()

    def remove_disk(self, disk_id, timeout=300):
        """Remove a disk and wait until the engine no longer lists it."""
        service = self.system.disks_service().disk_service(disk_id)
        with contextlib.suppress(sdk.NotFoundError):
            self.call(service.remove, what=f"remove disk {disk_id}")
        deadline = self.deadline(timeout)
        while self.get_disk(disk_id) is not None:
            if deadline.expired():
                raise EngineError(f"disk {disk_id} is still there {timeout} s after its removal")
            deadline.sleep()

    # Image transfers

    def start_transfer(
        self,
        disk_id=None,
        snapshot_id=None,
        direction="upload",
        inactivity_timeout=None,
        timeout_policy="cancel",
        host_id=None,
        keep_disk=False,
    ):
        """Create an image transfer and wait until it is transferring; return it.

        A transfer that does not start is undone (see undo_transfer) before
        the error is raised; keep_disk as there.
        """
        transfer = types.ImageTransfer(
            disk=types.Disk(id=disk_id) if disk_id and not snapshot_id else None,
            snapshot=types.DiskSnapshot(id=snapshot_id) if snapshot_id else None,
            direction=types.ImageTransferDirection(direction),
            format=types.DiskFormat.RAW,
            inactivity_timeout=inactivity_timeout,
            timeout_policy=types.ImageTransferTimeoutPolicy(timeout_policy),
            host=types.Host(id=host_id) if host_id else None,
        )
        transfers = self.system.image_transfers_service()
        transfer = self.call(
            transfers.add,
            transfer,
            what=f"start the {direction} of disk {snapshot_id or disk_id}",
            retry=False,
        )
        service = transfers.image_transfer_service(transfer.id)
        deadline = self.deadline(min(self.timeout, 120))
        while True:
            if transfer.phase == types.ImageTransferPhase.TRANSFERRING:
                return transfer
            failure = None
            if transfer.phase != types.ImageTransferPhase.INITIALIZING:
                failure = f"transfer {transfer.id} is {transfer.phase}"
            elif deadline.expired():
                failure = f"transfer {transfer.id} did not start in time"
            if failure is not None:
                failure = f"cannot start the {direction}: {failure}"
                try:
                    self.undo_transfer(transfer.id, direction, disk_id, keep_disk=keep_disk)
                except EngineError as e:
                    failure += f"; then undoing it failed: {e}"
                raise EngineError(failure)
            deadline.sleep()
            try:
                transfer = self.call(service.get, what=f"watch transfer {transfer.id}")
            except sdk.NotFoundError:
                raise EngineError(
                    f"cannot start the {direction}: the engine removed transfer {transfer.id}"
                ) from None

    def _phase_left(self, transfer_id, phases):
        """Whether the transfer is gone or in none of phases."""
        transfer = self.transfer(transfer_id)
        return transfer is None or str(transfer.phase) not in phases

    def transfer(self, transfer_id):
        service = self.system.image_transfers_service().image_transfer_service(transfer_id)
        try:
            return self.call(service.get, what=f"watch transfer {transfer_id}")
        except sdk.NotFoundError:
            return None

    def host(self, host_id):
        service = self.system.hosts_service().host_service(host_id)
        return self.call(service.get, what=f"look up host {host_id}")

    def host_by_name(self, name):
        service = self.system.hosts_service()
        found = [
            h
            for h in self.call(service.list, search=f'name="{name}"', what=f"look up host {name}")
            if h.name == name
        ]
        if not found:
            raise EngineError(f"host '{name}' not found")
        return found[0]

    def undo_transfer(self, transfer_id, direction, disk_id, keep_disk=False, timeout=300):
        """End a transfer that failed, and wait until the engine is done with it.

        The transfer of an upload to a new disk is cancelled: the engine then
        removes the disk, as nothing of it is worth keeping. Any other
        transfer is finalized, which keeps the disk: a download's, or an
        upload's to a disk the user made (keep_disk), since the engine removes
        the disk of any cancelled upload.
        """
        if direction == "upload" and not keep_disk:
            self.cancel_transfer(transfer_id, disk_id, timeout=timeout)
        else:
            # A download the engine stopped by itself (finished_failure)
            # still leaves the disk as it was.
            self.finalize_transfer(
                transfer_id,
                disk_id,
                timeout=timeout,
                direction=direction,
                failure_ok=direction == "download",
            )

    def cancel_transfer(self, transfer_id, disk_id=None, timeout=300):
        """Cancel, and wait until the transfer has ended and, for an upload,
        the engine has removed the disk (disk_id)."""
        with contextlib.suppress(sdk.NotFoundError):
            self._end_transfer(transfer_id, "cancel")
        deadline = self.deadline(timeout)
        while True:
            transfer = self.transfer(transfer_id)
            ended = transfer is None or transfer.phase in (
                types.ImageTransferPhase.FINISHED_FAILURE,
                types.ImageTransferPhase.FINISHED_SUCCESS,
            )
            if ended and (disk_id is None or self.get_disk(disk_id) is None):
                return
            if deadline.expired():
                left = f"disk {disk_id} is still there" if ended else f"it is {transfer.phase}"
                raise EngineError(f"cancelled transfer {transfer_id}, but after {timeout} s {left}")
            deadline.sleep()

    def finalize_transfer(
        self, transfer_id, disk_id, timeout=300, direction="upload", failure_ok=False
    ):
        """Finalize and wait until the engine is done with the transfer and the disk.

        failure_ok: a transfer that ends in finished_failure is not an error,
        if the disk is OK.
        """
        self._end_transfer(transfer_id, "finalize")
        deadline = self.deadline(timeout)
        while True:
            transfer = self.transfer(transfer_id)
            if transfer is None:
                # Older engines remove the transfer at once; the disk tells.
                disk = self.get_disk(disk_id)
                if disk is None:
                    raise EngineError(
                        f"finalizing transfer {transfer_id} failed: the engine removed disk "
                        f"{disk_id}"
                    )
                if disk.status == types.DiskStatus.OK:
                    return
                if disk.status == types.DiskStatus.ILLEGAL:
                    raise EngineError(
                        f"finalizing transfer {transfer_id} failed: disk {disk_id} is illegal"
                    )
            elif transfer.phase == types.ImageTransferPhase.FINISHED_SUCCESS or (
                failure_ok and transfer.phase == types.ImageTransferPhase.FINISHED_FAILURE
            ):
                self.wait_disk_ok(disk_id, what=f"finalize transfer {transfer_id}", timeout=timeout)
                return
            elif transfer.phase == types.ImageTransferPhase.FINISHED_FAILURE:
                why = (
                    "the engine could not verify the disk"
                    if direction == "upload"
                    else "the engine had stopped it"
                )
                raise EngineError(
                    f"finalizing transfer {transfer_id} failed: {why} (see the engine's events)"
                )
            if deadline.expired():
                raise EngineError(f"transfer {transfer_id} did not finish within {timeout} s")
            deadline.sleep()

    def _end_transfer(self, transfer_id, action):
        """Send cancel or finalize; a call whose answer was lost is not sent
        again once the transfer has left the open phases."""
        service = self.system.image_transfers_service().image_transfer_service(transfer_id)
        self.call(
            getattr(service, action),
            what=f"{action} transfer {transfer_id}",
            taken=lambda: self._phase_left(transfer_id, _TRANSFER_OPEN),
        )

    # Disk moves

    def move_disk(self, disk_id, storage_domain, correlation_id):
        """Ask the engine to move a disk to another storage domain (by name):
        a cold copy, or live storage migration for a disk of a running VM.
        Follow it with wait_jobs(correlation_id)."""
        service = self.system.disks_service().disk_service(disk_id)
        jobs = self.system.jobs_service()
        self.call(
            service.move,
            storage_domain=types.StorageDomain(name=storage_domain),
            query={"correlation_id": correlation_id},
            what=f"move disk {disk_id} to {storage_domain}",
            retry=False,
            # A job of this correlation id: the engine took the move.
            taken=lambda: bool(jobs.list(search=f"correlation_id={correlation_id}")),
        )

    def jobs(self, correlation_id):
        """The engine's jobs of this correlation id, as the SDK's jobs example finds them."""
        service = self.system.jobs_service()
        return self.call(
            service.list,
            search=f"correlation_id={correlation_id}",
            what=f"look up the jobs of {correlation_id}",
        )

    def job_progress(self, job_id):
        """Percent done of the job's step that reports progress, or None."""
        service = self.system.jobs_service().job_service(job_id).steps_service()
        steps = self.call(service.list, what=f"look up the steps of job {job_id}")
        done = [s.progress for s in steps if s.progress is not None]
        return max(done) if done else None

    def wait_jobs(self, correlation_id, what, timeout=None, on_progress=None):
        """Wait until no job of correlation_id is running; EngineError when
        one ended otherwise than finished. on_progress(percent) is called
        with each progress the engine reports."""
        deadline = self.deadline(timeout)
        while True:
            jobs = self.jobs(correlation_id)
            running = [j for j in jobs if j.status == types.JobStatus.STARTED]
            if jobs and not running:
                failed = [j for j in jobs if j.status != types.JobStatus.FINISHED]
                if failed:
                    job = failed[0]
                    raise JobFailed(
                        f"cannot {what}: the engine's job {job.description} ended "
                        f"{job.status.value} (see the engine's events)"
                    )
                return jobs
            if running and on_progress is not None:
                percent = self.job_progress(running[0].id)
                if percent is not None:
                    on_progress(percent)
            if deadline.expired():
                state = "running" if running else "not found"
                raise EngineError(f"cannot {what}: its job is still {state} after the timeout")
            deadline.sleep()
