# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Faults the engine answers with, in oVirt's words and status codes.

The REST layer of oVirt turns a failed validation into
``<fault><reason>Operation Failed</reason><detail>[message, ...]</detail></fault>``;
the HTTP status follows the message's error type (400 by default, 409 for
CONFLICT messages such as a locked disk, 500 for INTERNAL_ERROR). The message
texts below are the engine's own (AppErrors.properties) with ``${action}`` and
``${type}`` filled in, so clients matching on them keep working.
"""

from __future__ import annotations

BAD_REQUEST = 400
UNAUTHORIZED = 401
NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405
CONFLICT = 409
INTERNAL_ERROR = 500

REASON_FAILED = "Operation Failed"
REASON_INCOMPLETE = "Incomplete parameters"
REASON_INVALID_VALUE = "Invalid value"

# VAR__ACTION__* and VAR__TYPE__* of the engine.
ACTION_ADD = "add"
ACTION_REMOVE = "remove"
ACTION_EDIT = "edit"
ACTION_TRANSFER = "transfer"
ACTION_ATTACH = "attach"
ACTION_RUN = "run"
ACTION_REBOOT = "reboot"
ACTION_MOVE = "move"
TYPE_DISK = "Virtual Disk"
TYPE_VM = "VM"


class ApiError(Exception):
    """An error reply: a status and, unless bare, a fault body."""

    def __init__(self, status: int, reason: str | None = None, detail: str | None = None):
        super().__init__(detail or reason or str(status))
        self.status = status
        self.reason = reason
        self.detail = detail

    @property
    def bare(self) -> bool:
        return self.reason is None


def not_found() -> ApiError:
    """GET of a missing id: a 404 without a body, as the engine answers."""
    return ApiError(NOT_FOUND)


def entity_not_found(name: str) -> ApiError:
    """A name given in a request that does not resolve."""
    return ApiError(NOT_FOUND, REASON_FAILED, f"Entity not found: {name}")


def incomplete(model: str, missing: list[str], method: str) -> ApiError:
    """The REST layer's completeness check, e.g. "Disk [provisionedSize] required for add"."""
    return ApiError(
        BAD_REQUEST, REASON_INCOMPLETE, f"{model} [{', '.join(missing)}] required for {method}"
    )


def invalid_value(value: str, enum: str) -> ApiError:
    return ApiError(BAD_REQUEST, REASON_INVALID_VALUE, f"{value} is not a member of {enum}")


def bad_request(detail: str) -> ApiError:
    return ApiError(BAD_REQUEST, REASON_FAILED, detail)


def validation(status: int, *messages: str) -> ApiError:
    """A command refused by validation; the detail is the bracketed message list."""
    return ApiError(status, REASON_FAILED, "[" + ", ".join(messages) + "]")


# Validation messages (status, text). Each function returns an ApiError ready
# to raise; the action and type words are those of the failing command.


def disk_configuration_not_supported(fmt: str, sparse: bool, backup: str) -> ApiError:
    allocation = "Sparse" if sparse else "Preallocated"
    backup_word = "Incremental" if backup == "incremental" else "None"
    return validation(
        CONFLICT,
        f"Cannot {ACTION_ADD} {TYPE_DISK}. Disk configuration ({fmt.upper()} {allocation} "
        f"backup-{backup_word}) is incompatible with the storage domain type.",
    )


def storage_domain_not_specified() -> ApiError:
    return validation(
        BAD_REQUEST, f"Cannot {ACTION_ADD} {TYPE_DISK}. Storage Domain hasn't been specified."
    )


def storage_domain_not_exist(action: str = ACTION_ADD) -> ApiError:
    return validation(BAD_REQUEST, f"Cannot {action} {TYPE_DISK}. Storage Domain doesn't exist.")


def disk_space_low(domain_name: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {ACTION_ADD} {TYPE_DISK}. Low disk space on Storage Domain {domain_name}.",
    )


def disk_max_size_exceeded(max_gib: int) -> ApiError:
    return validation(CONFLICT, f"Cannot create disk more than {max_gib} GiB")


def disk_already_exists(disk_id: str, alias: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {ACTION_ADD} {TYPE_DISK}. The selected disk ID: {disk_id} is already used "
        f"by the following existing disk: {alias}.",
    )


def disk_not_exist(action: str) -> ApiError:
    return validation(
        BAD_REQUEST, f"Cannot {action} {TYPE_DISK}. The specified disk does not exist."
    )


def disks_locked(action: str, alias: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {action} {TYPE_DISK}: The following disks are locked: {alias}. "
        "Please try again in a few minutes.",
    )


def object_locked(action: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {action} {TYPE_DISK}. Related operation is currently in progress. "
        "Please try again later.",
    )


def disks_illegal(action: str, alias: str) -> ApiError:
    return validation(
        INTERNAL_ERROR,
        f"Cannot {action} {TYPE_DISK}. The following attached disks are in ILLEGAL status: "
        f"{alias} - please remove them and try again.",
    )


def disk_size_too_small() -> ApiError:
    return validation(
        BAD_REQUEST,
        f"Cannot {ACTION_EDIT} {TYPE_DISK}. New disk size must be larger than the current "
        "disk size.",
    )


def image_not_specified_for_download() -> ApiError:
    return validation(
        BAD_REQUEST, f"Cannot {ACTION_TRANSFER} {TYPE_DISK}. Image was not specified for download."
    )


def host_not_exist() -> ApiError:
    return validation(BAD_REQUEST, "The selected Host does not exist.")


def no_host_in_pool() -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {ACTION_TRANSFER} {TYPE_DISK}. There is no active Host in the Data Center.",
    )


def cannot_resume_transfer() -> ApiError:
    return validation(CONFLICT, "Cannot resume image transfer as it's not in a paused state.")


def cannot_pause_download() -> ApiError:
    return validation(
        BAD_REQUEST,
        "Cannot pause image download as it's handled by the client. Note that it can be "
        "canceled if you wish to stop it.",
    )


def vm_validation(action: str, message: str, status: int = CONFLICT) -> ApiError:
    """A VM command refused: "Cannot <action> VM. <message>"."""
    return validation(status, f"Cannot {action} {TYPE_VM}. {message}")


def vm_name_in_use(action: str) -> ApiError:
    return vm_validation(
        action,
        f"The {TYPE_VM} name is already in use, please choose a unique name and try again.",
    )


def vm_disks_locked(action: str, aliases: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {action} {TYPE_VM}: The following disks are locked: {aliases}. "
        "Please try again in a few minutes.",
    )


def attach_refused(message: str) -> ApiError:
    return validation(CONFLICT, f"Cannot {ACTION_ATTACH} {TYPE_DISK}. {message}")


def ide_hotplug(vm_name: str) -> ApiError:
    return validation(
        BAD_REQUEST,
        f"Cannot hot plug {TYPE_DISK} to {vm_name}. Hot plugging a disk to this interface is "
        "not supported: use virtio or virtio_scsi.",
    )


def disk_is_plugged(alias: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot detach {TYPE_DISK}. Disk {alias} is plugged into a running VM: "
        "deactivate it first.",
    )


def disk_attached_to_running_vm(action: str, alias: str) -> ApiError:
    return validation(
        CONFLICT,
        f"Cannot {action} {TYPE_DISK}. Disk {alias} is attached to a VM that is not down.",
    )


def hotplug_failed(alias: str, reason: str) -> ApiError:
    return validation(INTERNAL_ERROR, f"Failed to hot-plug or unplug disk {alias}: {reason}")
