# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  auth:
    description:
      - How to reach and log in to the oVirt engine.
      - The keys of the C(ovirt_auth) fact that C(ovirt.ovirt.ovirt_auth) returns, so that fact can
        be passed as it is, or set once for every module with C(module_defaults) and the
        C(group/thinair.ovirt.ovirt) action group.
      - Give C(username) and C(password), or a C(token).
      - May be left out when the environment holds the URL (E(OVIRT_URL) or E(OVIRT_HOSTNAME)) and
        the credentials, as the oVirt credential of AWX sets them.
    type: dict
    suboptions:
      url:
        description:
          - API URL of the engine, for example C(https://engine.example.com/ovirt-engine/api).
          - Taken from the E(OVIRT_URL) environment variable when not given.
        type: str
      hostname:
        description:
          - Name of the engine host; the URL becomes C(https://HOSTNAME/ovirt-engine/api).
          - Used when C(url) is not given; taken from E(OVIRT_HOSTNAME) when neither is given.
        type: str
      username:
        description:
          - User name with its profile, for example C(admin@internal).
          - Taken from E(OVIRT_USERNAME) when not given.
        type: str
      password:
        description:
          - Password of the user. Taken from E(OVIRT_PASSWORD) when not given.
        type: str
      token:
        description:
          - SSO token to use instead of a user name and password.
          - Taken from E(OVIRT_TOKEN) when not given.
        type: str
      ca_file:
        description:
          - PEM file of the CA that signed the engine's certificate (and imageio's).
          - Taken from E(OVIRT_CAFILE) when not given; the system's trusted CAs are used when
            neither is given.
        type: path
      insecure:
        description:
          - Do not verify the engine's and imageio's certificates. Only for tests.
        type: bool
        default: false
      timeout:
        description:
          - Seconds one API request may take; 0 waits as long as it takes.
        type: int
        default: 0
      compress:
        description:
          - Ask the engine for compressed replies.
        type: bool
        default: true
      kerberos:
        description:
          - Log in with Kerberos instead of a user name and password.
        type: bool
        default: false
      headers:
        description:
          - Extra HTTP headers sent with every API request.
        type: dict
  timeout:
    description:
      - Seconds the whole operation may take before it is given up and undone.
    type: int
    default: 3600
  poll_interval:
    description:
      - Longest pause, in seconds, between two looks at the engine while waiting for it.
      - Waiting starts with short pauses that grow up to this value.
    type: float
    default: 1.0
requirements:
  - ovirt-engine-sdk-python >= 4.6.0
"""

    TRANSFER = r"""
options:
  max_workers:
    description:
      - Connections that move data at the same time, from 1 to 8, bounded by what imageio allows.
    type: int
    default: 4
  buffer_size:
    description:
      - Largest single request in bytes, from 64 KiB to 32 MiB.
    type: int
    default: 8388608
  transfer_host:
    description:
      - Name of the host that serves the transfer. The engine picks one when not given.
    type: str
  proxy:
    description:
      - How to reach imageio. C(auto) uses the host and falls back to the engine's imageio proxy
        when the host cannot be reached; C(always) uses only the proxy; C(never) only the host.
    type: str
    choices: [auto, always, never]
    default: auto
  heartbeat_file:
    description:
      - A file the caller touches while it follows the module run in the background (C(async)),
        as the C(upload_disk) and C(download_disk) roles do. Once touched after the module
        started, if it is not touched for I(heartbeat_timeout) seconds the module stops and undoes
        its work, as on SIGTERM, since the playbook that followed it has stopped.
    type: path
  heartbeat_timeout:
    description:
      - Seconds without a touch of I(heartbeat_file) after which the module stops.
    type: int
    default: 30
  retry_timeout:
    description:
      - Seconds a request to imageio that lost its connection (the daemon restarting, a reset
        connection) is sent again on new connections before the transfer fails. Every request
        is idempotent, so the copy goes on where it was.
    type: int
    default: 60
  inactivity_timeout:
    description:
      - Seconds the engine lets the transfer sit idle before applying I(timeout_policy); the
        engine's default when not given.
    type: int
  timeout_policy:
    description:
      - What the engine does with an idle transfer. C(cancel) ends it (an upload's new disk is
        removed); C(pause) and C(legacy) pause it and keep the disk locked.
    type: str
    choices: [legacy, pause, cancel]
    default: cancel
  progress_file:
    description:
      - File on the node where the module keeps a JSON record of its progress (phase, bytes done,
        percent, rate, ETA) while it runs; removed at the end.
      - Meant for runs with C(async); the roles use it to print progress lines.
    type: path
"""
