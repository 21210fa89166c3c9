# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Options every engine-facing module shares, documented once in doc_fragments/_engine.py."""

from __future__ import annotations

from ansible.module_utils.basic import env_fallback

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
    "auth": {"type": "dict", "required": True, "options": AUTH_OPTIONS},
    "timeout": {"type": "int", "default": 3600},
    "poll_interval": {"type": "float", "default": 1.0},
}


# Options of the data path, shared by disk_upload and disk_download.
TRANSFER_OPTIONS = {
    "max_workers": {"type": "int", "default": 4},
    "buffer_size": {"type": "int", "default": 8388608},
    "transfer_host": {"type": "str"},
    "proxy": {"type": "str", "choices": ["auto", "always", "never"], "default": "auto"},
    "inactivity_timeout": {"type": "int"},
    "timeout_policy": {
        "type": "str",
        "choices": ["legacy", "pause", "cancel"],
        "default": "cancel",
    },
    "progress_file": {"type": "path"},
}


def argument_spec(**options):
    """The module's own options merged with the shared ones."""
    spec = dict(COMMON_OPTIONS)
    spec.update(options)
    return spec
