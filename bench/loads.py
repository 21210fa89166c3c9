# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Uploads at once, measured on a lab through the upload_disk role: eight
1 GiB images at once against one of them alone, twenty 64 MiB images at once
against one alone, in one run. Prints each run's time, its data rate, the
rate against one upload alone, and the peak memory of the client side:
ansible-playbook, the modules in the background and their qemu-nbd, their
proportional set sizes summed ten times a second."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)

MiB = 1024**2
GiB = 1024**3

# (count, virtual size, data in each): each load after one upload of the
# same images alone, its reference.
CASES = (
    (1, 1 * GiB, 256 * MiB),
    (8, 1 * GiB, 256 * MiB),
    (1, 64 * MiB, 16 * MiB),
    (20, 64 * MiB, 16 * MiB),
)
# The processes of the client side.
CLIENT = (b"ansible-playbook", b"AnsiballZ_", b"async_wrapper", b"qemu-nbd")


def load_suite(workdir):
    sys.path.insert(0, ROOT)
    from lab.lab import Lab

    images = os.path.join(workdir, "load-images")
    os.makedirs(images, exist_ok=True)
    lab_dir = os.path.join(workdir, "load-lab")
    shutil.rmtree(lab_dir, ignore_errors=True)
    lab = Lab(lab_dir)
    info = lab.start(host_address="127.0.0.2")
    auth = {k: info[k] for k in ("username", "password", "ca_file")}
    auth["url"] = info["engine_url"]
    rows = []
    try:
        for count, size, data in CASES:
            paths = [make_image(images, size, data, i) for i in range(count)]
            disks = [
                {"image": path, "name": f"load-{count}-{i}", "storage_domain": "nfs1"}
                for i, path in enumerate(paths)
            ]
            seconds, peak = timed(upload_playbook(workdir, auth, disks), images)
            rows.append(
                {"count": count, "size": size, "data": count * data, "seconds": seconds,
                 "peak": peak}
            )  # fmt: skip
            remove_disks(info, [d["name"] for d in disks])
    finally:
        lab.stop()
    return rows


def make_image(directory, size, data, seed):
    """A qcow2 image of size bytes, holding data bytes in runs of 16 MiB."""
    path = os.path.join(directory, f"{size // MiB}m-{seed}.qcow2")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path + ".tmp", str(size)],
                       check=True)  # fmt: skip
        runs = data // (16 * MiB)
        slot = size // runs
        commands = []
        for i in range(runs):
            commands += ["-c", f"write -P {(seed * 7 + i) % 250 + 1} {i * slot} 16M"]
        subprocess.run(["qemu-io", "-f", "qcow2", *commands, path + ".tmp"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        os.rename(path + ".tmp", path)
    return path


def upload_playbook(workdir, auth, disks):
    extra = os.path.join(workdir, "load-vars.json")
    with open(extra, "w") as f:
        json.dump({"upload_disk_auth": auth, "upload_disk_disks": disks}, f)
    return [os.path.join(BIN, "ansible-playbook"),
            os.path.join(ROOT, "playbooks", "upload_disk.yml"), "-e", f"@{extra}"]  # fmt: skip


def timed(cmd, images):
    """Run cmd; its wall time and the peak of the client side's summed RSS."""
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, client_rss(images))

    sampler = threading.Thread(target=sample)
    start = time.monotonic()
    sampler.start()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    finally:
        done.set()
        sampler.join()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the uploads failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return seconds, peak


def client_rss(images):
    """Bytes resident in the processes of the client side."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if not any(word in cmdline for word in CLIENT):
                continue
            # qemu-nbd of the lab's host serves volumes, not our images.
            if b"qemu-nbd" in cmdline and images.encode() not in cmdline:
                continue
            # Proportional: pages a fork shares with its parent count once.
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def remove_disks(info, names):
    import ovirtsdk4 as sdk

    con = sdk.Connection(url=info["engine_url"], username=info["username"],
                         password=info["password"], ca_file=info["ca_file"])  # fmt: skip
    try:
        disks = con.system_service().disks_service()
        for disk in disks.list():
            if disk.alias in names:
                disks.disk_service(disk.id).remove()
    finally:
        con.close()


def print_load_table(rows):
    print("| uploads at once | image | s | data MiB/s | rate against one alone "
          "| client peak memory MiB |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|")
    one = None
    for row in rows:
        rate = row["data"] / row["seconds"]
        if row["count"] == 1:
            one = rate
        image = f"{row['size'] // MiB} MiB qcow2, {row['data'] // row['count'] // MiB} MiB data"
        print(f"| {row['count']} | {image} | {row['seconds']:.2f} | {rate / MiB:.0f} "
              f"| {rate / one:.2f} | {row['peak'] / MiB:.0f} |")  # fmt: skip
