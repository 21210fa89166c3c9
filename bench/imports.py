# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The quick import, measured on a lab: how long `ansible-playbook
playbooks/import_vm.yml` takes from its start until the VM runs
(powering_up), for a VM whose data disk is 1 GiB and 16 GiB (a quarter of it
data), with `method: external` (the VM runs from its exports) and `method:
copy` (the disks are copied first, as on a stock engine), in one run; and a
whole import (VMs up, disks moved, exports stopped) of four VMs in one run
against one VM, in pairs (one VM, then four), a ratio a pair: the machine's
pace drifts from minute to minute, and a pair's two runs share it."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)

MiB = 1024**2
GiB = 1024**3
SIZES = (1 * GiB, 16 * GiB)
DATA_RUN = 64 * MiB


def import_suite(workdir, rounds):
    sys.path.insert(0, ROOT)
    from lab import guest
    from lab.lab import Hooks, Lab

    sources = os.path.join(workdir, "import-sources")
    shutil.rmtree(sources, ignore_errors=True)
    os.makedirs(sources)
    boot = os.path.join(sources, "boot.qcow2")
    guest.build(boot, fmt="qcow2")
    data = {size: make_data_disk(sources, size) for size in SIZES}

    lab_dir = os.path.join(workdir, "import-lab")
    shutil.rmtree(lab_dir, ignore_errors=True)
    lab = Lab(lab_dir)
    info = lab.start()
    hooks = Hooks(info["hooks_url"], info["ca_file"])
    auth = {k: info[k] for k in ("username", "password", "ca_file")}
    auth["url"] = info["engine_url"]
    rows = {"starts": [], "fleet": []}
    try:
        for size in SIZES:
            for method in ("external", "copy"):
                times = []
                for _round in range(rounds):
                    vms = [vm_spec("bench-import", boot, data[size])]
                    times.append(run_import(hooks, auth, workdir, vms, method, keep=False))
                    # A copied VM's disks are on their domain: its import is complete.
                    rollback(auth, workdir, vms, force=True)
                running = min(t["running"] for t in times)
                total = min(t["total"] for t in times)
                rows["starts"].append(
                    {"size": size, "method": method, "running": running, "total": total}
                )
        for _round in range(rounds):
            pair = {}
            for count in (1, 4):
                vms = [vm_spec(f"bench-fleet-{i}", boot, data[SIZES[0]]) for i in range(count)]
                run = run_import(hooks, auth, workdir, vms, "external", keep=True, watch=False)
                pair[count] = run["total"]
                rollback(auth, workdir, vms, force=True)
            rows["fleet"].append(pair)
    finally:
        lab.stop()
    return rows


def make_data_disk(directory, size):
    """A qcow2 data disk with a quarter of its size as data, in runs spread over it."""
    path = os.path.join(directory, f"data-{size // GiB}g.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    runs = size // 4 // DATA_RUN
    slot = size // runs
    commands = []
    for i in range(runs):
        commands += ["-c", f"write -P {0x11 + i % 200} {i * slot} {DATA_RUN}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, path], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return path


def vm_spec(name, boot, data):
    return {
        "name": name,
        "cluster": "Default",
        "memory": "256MiB",
        "cpus": 1,
        "disks": [{"image": boot, "interface": "virtio_scsi"}, {"image": data}],
    }


def playbook(name, extra_vars, workdir):
    vars_file = os.path.join(workdir, "import-vars.json")
    with open(vars_file, "w") as f:
        json.dump(extra_vars, f)
    proc = subprocess.run(
        [os.path.join(BIN, "ansible-playbook"), os.path.join(ROOT, "playbooks", name),
         "-e", f"@{vars_file}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")


def run_import(hooks, auth, workdir, vms, method, keep, watch=True):
    """Seconds from the playbook's start until every VM runs (when watched),
    and until it ends. Watching asks the lab every 50 ms, CPU that a whole
    import's timing should not share its cores with."""
    names = {vm["name"] for vm in vms}
    running_at = {}
    done = threading.Event()

    def follow():
        while not done.is_set() and len(running_at) < len(names):
            for vm in hooks.state()["vms"]:
                if vm["name"] in names and vm["status"] in ("powering_up", "up"):
                    running_at.setdefault(vm["name"], time.monotonic())
            time.sleep(0.05)

    watcher = threading.Thread(target=follow) if watch else None
    start = time.monotonic()
    if watcher:
        watcher.start()
    try:
        playbook(
            "import_vm.yml",
            {
                "quick_import_auth": auth,
                "quick_import_vms": vms,
                "quick_import_temporary_storage_domain": "scratch",
                "quick_import_storage_domain": "nfs1",
                "quick_import_method": method,
                "quick_import_keep": keep,
            },
            workdir,
        )
    finally:
        total = time.monotonic() - start
        done.set()
        if watcher:
            watcher.join()
    if not watcher:
        return {"total": total}
    if len(running_at) < len(names):
        raise RuntimeError(f"not every VM was seen running: {sorted(names - set(running_at))}")
    return {"running": max(running_at.values()) - start, "total": total}


def rollback(auth, workdir, vms, force=False):
    playbook(
        "rollback_vm.yml",
        {
            "rollback_import_auth": auth,
            "rollback_import_vm_name": [vm["name"] for vm in vms],
            "rollback_import_force": force,
        },
        workdir,
    )


def print_import_tables(rows):
    print("| data disk (a quarter data) | method | playbook start → VM running s | playbook s |")
    print("|---|---|---:|---:|")
    for row in rows["starts"]:
        print(f"| {row['size'] // GiB} GiB | {row['method']} | {row['running']:.2f} "
              f"| {row['total']:.2f} |")  # fmt: skip
    print()
    print("| whole import, 2 disks a VM (1 GiB data disk) | 1 VM s | 4 VMs s | ratio |")
    print("|---|---:|---:|---:|")
    pairs = rows["fleet"]
    for number, pair in enumerate(pairs, 1):
        print(f"| pair {number} | {pair[1]:.2f} | {pair[4]:.2f} | {pair[4] / pair[1]:.2f} |")
    print(f"| median | {statistics.median(p[1] for p in pairs):.2f} "
          f"| {statistics.median(p[4] for p in pairs):.2f} "
          f"| {statistics.median(p[4] / p[1] for p in pairs):.2f} |")  # fmt: skip
