# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Options every engine-facing module shares, documented once in doc_fragments/_engine.py."""

from __future__ import annotations

import re

from ansible.module_utils.basic import env_fallback

SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}

# The keys of the ovirt_auth fact of ovirt.ovirt, so a playbook can pass that
# fact, or put the dict in module_defaults for the thinair.ovirt.ovirt group.
AUTH_OPTIONS = {
    "url": {"type": "str", "fallback": (env_fallback, ["OVIRT_URL"])},
    "hostname": {"type": "str", "fallback": (env_fallback, ["OVIRT_HOSTNAME"])},
    "username": {"type": "str", "fallback": (env_fallback, ["OVIRT_USERNAME"])},
    "password": {"type": "str", "no_log": True, "fallback": (env_fallback, ["OVIRT_PASSWORD"])},
    "token": {"type": "str", "no_log": True, "fallback": (env_fallback, ["OVIRT_TOKEN"])},
    "ca_file": {"type": "path", "fallback": (env_fallback, ["OVIRT_CAFILE"])},
    "insecure": {"type": "bool", "default": False},
    "timeout": {"type": "int", "default": 0},
    "compress": {"type": "bool", "default": True},
    "kerberos": {"type": "bool", "default": False},
    "headers": {"type": "dict"},
}

COMMON_OPTIONS = {
    # Left out, it is read from the environment alone (apply_defaults runs
    # the fallbacks), as AWX's oVirt credential provides it.
    "auth": {"type": "dict", "options": AUTH_OPTIONS, "apply_defaults": True},
    "timeout": {"type": "int", "default": 3600},
    "poll_interval": {"type": "float", "default": 1.0},
}


# Options of the data path, shared by disk_upload and disk_download.
TRANSFER_OPTIONS = {
    "max_workers": {"type": "int", "default": 4},
    "buffer_size": {"type": "int", "default": 8388608},
    "transfer_host": {"type": "str"},
    "proxy": {"type": "str", "choices": ["auto", "always", "never"], "default": "auto"},
    "retry_timeout": {"type": "int", "default": 60},
    "inactivity_timeout": {"type": "int"},
    "timeout_policy": {
        "type": "str",
        "choices": ["legacy", "pause", "cancel"],
        "default": "cancel",
    },
    "progress_file": {"type": "path"},
    "heartbeat_file": {"type": "path"},
    "heartbeat_timeout": {"type": "int", "default": 30},
}


def argument_spec(**options):
    """The module's own options merged with the shared ones."""
    spec = dict(COMMON_OPTIONS)
    spec.update(options)
    return spec


def parse_size(value):
    """Bytes from an int or a string such as 256MiB or 4 GiB, as ovirt.ovirt
    writes sizes; ValueError with the accepted forms otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.match(r"^\s*(\d+)\s*([A-Za-z]*)\s*$", str(value))
    unit = match.group(2).lower() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(
            f"invalid size '{value}': give bytes or a number with KiB, MiB, GiB or TiB"
        )
    return int(match.group(1)) * SIZE_UNITS[unit]
