# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Command line of the lab.

    python -m lab start --dir DIR [--host-address 127.0.0.2] [--stock]
    python -m lab status --dir DIR
    python -m lab stop --dir DIR
    python -m lab guest-image PATH [--size BYTES] [--format raw|qcow2]

``start`` returns once the engine answers and prints one JSON line: engine
URL, CA file, credentials, storage domains and the test hooks URL.
``guest-image`` builds the small bootable guest the lab's VMs run
(lab/guest.py). ``serve``
is the background process ``start`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from lab import guest
from lab.lab import Lab, LabError, serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start the lab in the background")
    _add_dir(start)
    start.add_argument(
        "--host-address",
        help="loopback address of the host's imageio daemon (default 127.0.0.2, "
        "or the one used before)",
    )
    start.add_argument(
        "--stock",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="behave as a released engine for fields it ignores (kept across restarts)",
    )
    start.add_argument("--port", type=int, help="engine HTTPS port (default: the one used before)")
    start.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between visits of open transfers (default 1)",
    )
    start.add_argument(
        "--guest-wait-timeout",
        type=float,
        help="seconds after which a running VM whose guest agent never answered is "
        "reported up (vdsm's 60, the default; kept across restarts)",
    )
    start.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds a VM may take to power off after an ACPI shutdown before it is "
        "reported up again (default 120; kept across restarts)",
    )
    start.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the engine (default 60)"
    )

    for name, text in (("stop", "stop every process of the lab"), ("status", "tell the state")):
        _add_dir(commands.add_parser(name, help=text))

    image = commands.add_parser("guest-image", help="build the lab's bootable guest image")
    image.add_argument("path", help="the image file to write")
    image.add_argument("--size", type=int, help="virtual size in bytes (default: the minimum)")
    image.add_argument("--format", choices=("raw", "qcow2"), default="raw")

    _add_dir(commands.add_parser("serve", help="run the lab in the foreground (used by start)"))

    args = parser.parse_args(argv)
    if args.command == "guest-image":
        try:
            result = guest.build(args.path, size=args.size, fmt=args.format)
        except guest.GuestError as e:
            print(f"lab guest-image: {e}", file=sys.stderr)
            return 1
        print(json.dumps(result, sort_keys=True))
        return 0
    lab = Lab(args.dir)
    try:
        if args.command == "start":
            result = lab.start(
                host_address=args.host_address,
                stock=args.stock,
                port=args.port,
                poll_interval=args.poll_interval,
                guest_wait_timeout=args.guest_wait_timeout,
                shutdown_timeout=args.shutdown_timeout,
                timeout=args.timeout,
            )
        elif args.command == "stop":
            result = lab.stop()
        elif args.command == "status":
            result = lab.status()
        else:
            serve(args.dir)
            return 0
    except LabError as e:
        print(f"lab {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


def _add_dir(parser):
    parser.add_argument("--dir", required=True, help="the lab directory (created if missing)")


if __name__ == "__main__":
    sys.exit(main())
