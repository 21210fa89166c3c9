# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Watch a quick import on the lab and print its timeline.

    python demo/timeline.py --lab DIR --vm NAME --exports PATTERN --out FILE

Started before the import, it looks at the lab every 50 ms and notes, in
seconds from its own start, when each step is first seen: the exports
running, the VM's disks created, the VM running and up, the guest's ready
line on its console, the disk moves started and pivoted, the exports
stopped. It ends once the exports stopped after a move (or after --timeout
seconds) and writes the timeline to FILE as JSON lines of [seconds, event].
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab import guest  # noqa: E402
from lab.lab import Hooks, Lab  # noqa: E402

INTERVAL = 0.05
READY = "guest ready line on its console"
MOVING = "disk moves started (mirrors running)"
PIVOTED = "disks pivoted to the target domain"
STOPPED = "exports stopped"


def exports_running(pattern):
    out = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{pattern}"], capture_output=True, check=False)
    return bool(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--lab", required=True, help="the lab directory")
    parser.add_argument("--vm", required=True, help="name of the VM imported")
    parser.add_argument("--exports", required=True, help="what the exports' command lines hold")
    parser.add_argument("--out", required=True, help="file for the timeline")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    info = Lab(args.lab).info()
    hooks = Hooks(info["hooks_url"], info["ca_file"])
    start = time.monotonic()
    seen: dict[str, float] = {}

    def note(event, happened=True):
        if happened and event not in seen:
            seen[event] = round(time.monotonic() - start, 2)

    while time.monotonic() - start < args.timeout:
        state = hooks.state()
        exported = exports_running(args.exports)
        note("exports running", exported)
        vm = next((v for v in state["vms"] if v["name"] == args.vm), None)
        disks = [d for d in state["disks"] if d["alias"].startswith(args.vm)]
        note("disks created", bool(disks))
        if vm is not None:
            note("VM running (powering_up)", vm["status"] in ("powering_up", "up"))
            note("VM up", vm["status"] == "up")
            if vm["status"] in ("powering_up", "up") and READY not in seen:
                note(READY, guest.READY in hooks.console(vm["id"]))
            jobs = vm.get("block_jobs") or []
            note(MOVING, bool(jobs))
            if MOVING in seen:
                note(PIVOTED, not jobs)
        if PIVOTED in seen:
            note(STOPPED, not exported)
            if STOPPED in seen:
                break
        time.sleep(INTERVAL)

    with open(args.out, "w") as f:
        for event, at in sorted(seen.items(), key=lambda item: item[1]):
            f.write(json.dumps([at, event]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
