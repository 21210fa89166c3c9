# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Benchmarks, each against its reference measured in the same run.

    .venv/bin/python bench/run.py copy|transfer|vm|import|load [--dir DIR] [--rounds N]

copy: a local image into a new local qcow2 through the streaming core
against `qemu-img convert` of the same image: (a) 6 GiB with 1.5 GiB of
random data in 64 MiB runs, as raw and as qcow2, (b) an empty 8 TiB qcow2;
once with qemu-nbd on both sides (NBD in between), once with the core's
direct file access (what uploads and downloads use for local images). With
qemu-nbd on both sides, qemu-img convert between the same two exports is a
second reference: what the NBD arrangement itself costs. Then the source
export is read through a proxy delaying everything 2 ms each way (a remote
export), against our loopback time, qemu-img through the same proxy and
ours through the proxy without delay (what the proxy's own copying costs).

transfer: on a lab (host on 127.0.0.2, so imageio is reached over TLS),
upload the 6 GiB qcow2 to nfs1 and iscsi1, download it back to qcow2, and
upload the empty 8 TiB qcow2: end to end (ansible-playbook running the module
against the ovirt-img CLI) and the data path alone (module_utils against
ovirt_imageio.client, into the same kind of disk and transfer), with the
ceiling (the same data extents sent from memory over the same connections,
nothing read) and `qemu-img convert` of the same image between local files
as limits.

vm: on a lab, engine start to a running VM, to the guest's ready line and to
up, and a live storage migration against qemu-img convert (bench/vms.py).

import: on a lab, import_vm.yml's start to a running VM for 1 GiB and 16 GiB
disks, external and copied, and a whole import of four VMs against one
(bench/imports.py).

load: on a lab, eight uploads at once through the upload_disk role and twenty
small ones, each against one of the same alone, with the client side's peak
memory (bench/loads.py).

Prints wall time, CPU seconds (user+sys, child processes included), peak
RSS and the ratios, as tables ready for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from functools import partial

from imports import import_suite, print_import_tables
from loads import load_suite, print_load_table
from vms import print_vm_tables, vm_suite

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# The reference copy. qemu-img convert's default cache mode for the target
# is "unsafe": it never flushes, and leaves the data in the page cache. Ours
# is on storage when the copy returns, so the reference writes with O_DIRECT
# as well ("none"), the same kind of writes.
QEMU_IMG_CONVERT = ["qemu-img", "convert", "-t", "none", "-O", "qcow2"]

DATA_IMAGE_SIZE = 6 * GiB
DATA_RUN = 64 * MiB
DATA_RUNS = 24  # 1.5 GiB
# copy: the latency of the link to a remote source export, each way.
DELAY_MS = 2


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("suite", choices=["copy", "transfer", "vm", "import", "load"])
    parser.add_argument("--dir", default=os.path.join(ROOT, ".cache", "bench"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="best of N runs of each command; N pairs for the whole imports",
    )
    parser.add_argument(
        "--host-address",
        default="127.0.0.2",
        help="transfer: the lab host's address; 127.0.0.1 puts the client on the host, where "
        "imageio's unix socket is used",
    )
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.suite == "vm":
        rows = vm_suite(args.dir, args.rounds)
        print_vm_tables(rows)
    elif args.suite == "import":
        rows = import_suite(args.dir, args.rounds)
        print_import_tables(rows)
    elif args.suite == "load":
        rows = load_suite(args.dir)
        print_load_table(rows)
    elif args.suite == "copy":
        rows = copy_suite(args.dir, args.rounds)
        print_table([r for r in rows if "qemu-img" in r], "qemu-img")
        print()
        print_table([r for r in rows if "qemu-img over NBD" in r], "qemu-img over NBD")
        print()
        print_table([r for r in rows if "loopback" in r], "loopback")
        print()
        print_table([r for r in rows if "proxy, no delay" in r], "proxy, no delay")
    else:
        rows = transfer_suite(args.dir, args.rounds, args.host_address)
        print_table([r for r in rows if "ovirt-img" in r], "ovirt-img")
        print()
        print_table([r for r in rows if "imageio" in r], "imageio")
        print()
        print_table([r for r in rows if "ceiling" in r], "ceiling")
        print()
        print_table([r for r in rows if "qemu-img" in r], "qemu-img")
    with open(os.path.join(args.dir, f"{args.suite}.json"), "w") as f:
        json.dump(rows, f, indent=2)


def copy_suite(workdir, rounds):
    raw, qcow2, empty = make_images(workdir)
    out = os.path.join(workdir, "out.qcow2")
    ours = [PYTHON, os.path.join(HERE, "copy_image.py")]
    rows = []
    for name, image in [
        ("6 GiB raw, 1.5 GiB data", raw),
        ("6 GiB qcow2, 1.5 GiB data", qcow2),
        ("8 TiB qcow2, empty", empty),
    ]:
        fmt = "raw" if image.endswith(".raw") else "qcow2"
        reference = best(rounds, [*QEMU_IMG_CONVERT, "-f", fmt, image, out], out)
        for how, options in (("qemu-nbd both sides", []), ("direct file access", ["--direct"])):
            row = {"case": f"{name}, {how}", "qemu-img": reference}
            row["ours"] = best(rounds, [*ours, image, out, *options], out)
            check_identical(image, out)
            if not options:
                row["qemu-img over NBD"] = best(rounds, [*ours, image, out, "--qemu-img"], out)
                check_identical(image, out)
            rows.append(row)
        if image != empty:
            # The source export read through a link with latency, both ways.
            delay = ["--delay", str(DELAY_MS)]
            row = {"case": f"{name}, source {DELAY_MS} ms away", "loopback": rows[-2]["ours"]}
            row["proxy, no delay"] = best(rounds, [*ours, image, out, "--delay", "0"], out)
            check_identical(image, out)
            row["ours"] = best(rounds, [*ours, image, out, *delay], out)
            check_identical(image, out)
            row["qemu-img over NBD"] = best(rounds, [*ours, image, out, "--qemu-img", *delay], out)
            check_identical(image, out)
            rows.append(row)
    return rows


def transfer_suite(workdir, rounds, host_address):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, ".collections"))
    from ansible_collections.thinair.ovirt.plugins.module_utils import _engine, _image, _plan
    from lab.lab import Lab

    _, qcow2, empty = make_images(workdir)
    lab_dir = os.path.join(workdir, "lab")
    subprocess.run(["rm", "-rf", lab_dir], check=True)
    lab = Lab(lab_dir)
    info = lab.start(host_address=host_address)
    auth = {
        "url": info["engine_url"],
        "username": info["username"],
        "password": info["password"],
        "ca_file": info["ca_file"],
    }
    engine = _engine.Engine(auth, timeout=600, poll_interval=0.2)
    facts = {image: _image.inspect(image) for image in (qcow2, empty)}
    out = os.path.join(workdir, "download.qcow2")
    try:
        rows = []
        for image, domain, name in [
            (qcow2, "nfs1", "upload 6 GiB qcow2 (1.5 GiB data) to nfs1"),
            (qcow2, "iscsi1", "upload 6 GiB qcow2 (1.5 GiB data) to iscsi1"),
            (empty, "nfs1", "upload empty 8 TiB qcow2 to nfs1"),
        ]:
            spec = _plan.disk_spec(facts[image], info["storage_domains"][domain]["storage_type"])
            row = {"case": name}
            row["ours"] = best(rounds, partial(upload_playbook, auth, image, domain), None,
                               after=partial(remove_disks, engine))  # fmt: skip
            row["ovirt-img"] = best(rounds, partial(ovirt_img_upload, info, image, domain), None,
                                    after=partial(remove_disks, engine))  # fmt: skip
            rows.append(row)
            data_row = {"case": name + ", data path"}
            for client in ("ours", "imageio", "ceiling"):
                data_row[client] = best(
                    rounds,
                    partial(data_path_upload, engine, info, client, spec, domain, image),
                    None,
                    after=partial(remove_disks, engine),
                )
            if image == qcow2:
                data_row["qemu-img"] = best(rounds, [*QEMU_IMG_CONVERT, image, out], out)
            rows.append(data_row)

        # One disk holding the 6 GiB image, downloaded by everyone.
        spec = _plan.disk_spec(facts[qcow2], "nfs")
        disk = data_path_upload(engine, info, "ours", spec, "nfs1", qcow2, run_it=True)
        name = "download 6 GiB disk (1.5 GiB data) to qcow2"
        row = {"case": name}
        row["ours"] = best(rounds, partial(download_playbook, auth, disk, out), out)
        row["ovirt-img"] = best(rounds, partial(ovirt_img_download, info, disk, out), out)
        check_identical(qcow2, out)
        rows.append(row)
        data_row = {"case": name + ", data path"}
        for client in ("ours", "imageio"):
            data_row[client] = best(
                rounds, partial(data_path_download, engine, info, client, disk, out), out
            )
            check_identical(qcow2, out)
        data_row["qemu-img"] = best(rounds, [*QEMU_IMG_CONVERT, qcow2, out], out)
        rows.append(data_row)
        return rows
    finally:
        engine.close()
        lab.stop()


def upload_playbook(auth, image, domain):
    task = {
        "thinair.ovirt.disk_upload": {
            "auth": auth,
            "image": image,
            "storage_domain": domain,
            "name": f"bench-{time.monotonic_ns()}",
        }
    }
    return playbook_command([task])


def download_playbook(auth, disk_id, out):
    task = {"thinair.ovirt.disk_download": {"auth": auth, "disk_id": disk_id, "dest": out}}
    return playbook_command([task])


def playbook_command(tasks):
    path = os.path.join(ROOT, ".cache", "bench", "playbook.yml")
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    with open(path, "w") as f:
        json.dump(play, f)
    return [os.path.join(os.path.dirname(PYTHON), "ansible-playbook"), path]


def ovirt_img(info, *args):
    base = info["engine_url"].rsplit("/ovirt-engine", 1)[0]
    return [
        os.path.join(os.path.dirname(PYTHON), "ovirt-img"),
        args[0],
        "--engine-url", base,
        "--username", info["username"],
        "--password-file", info["password_file"],
        "--cafile", info["ca_file"],
        *args[1:],
    ]  # fmt: skip


def ovirt_img_upload(info, image, domain):
    name = f"bench-{time.monotonic_ns()}"
    return ovirt_img(info, "upload-disk", "-s", domain, "--name", name, image)


def ovirt_img_download(info, disk_id, out):
    return ovirt_img(info, "download-disk", disk_id, out)


def data_path_upload(engine, info, client, spec, domain, image, run_it=False):
    """Create a disk and an upload transfer, then time only the copy into it."""
    disk = engine.create_disk(spec, domain, f"bench-{time.monotonic_ns()}")
    transfer = engine.start_transfer(disk_id=disk.id, direction="upload")
    try:
        cmd = [PYTHON, os.path.join(HERE, "data_path.py"), client, "upload", image,
               transfer.transfer_url, info["ca_file"]]  # fmt: skip
        if run_it:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            return disk.id
        return run(cmd, None)
    finally:
        engine.finalize_transfer(transfer.id, disk.id)


def data_path_download(engine, info, client, disk_id, out):
    transfer = engine.start_transfer(disk_id=disk_id, direction="download")
    try:
        cmd = [PYTHON, os.path.join(HERE, "data_path.py"), client, "download", out,
               transfer.transfer_url, info["ca_file"]]  # fmt: skip
        return run(cmd, out)
    finally:
        engine.finalize_transfer(transfer.id, disk_id)


def remove_disks(engine):
    service = engine.system.disks_service()
    for disk in service.list():
        if not (disk.alias or "").startswith("bench-"):
            continue
        engine.wait_disk_ok(disk.id)
        engine.remove_disk(disk.id)


def make_images(workdir):
    raw = os.path.join(workdir, "data-6g.raw")
    qcow2 = os.path.join(workdir, "data-6g.qcow2")
    empty = os.path.join(workdir, "empty-8t.qcow2")
    if not os.path.exists(raw):
        print(f"creating {raw}", file=sys.stderr)
        rnd = random.Random(42)
        slot = DATA_IMAGE_SIZE // DATA_RUNS
        with open(raw + ".tmp", "wb") as f:
            f.truncate(DATA_IMAGE_SIZE)
            for i in range(DATA_RUNS):
                offset = i * slot + rnd.randrange(0, slot - DATA_RUN, MiB)
                f.seek(offset)
                f.write(os.urandom(DATA_RUN))
        os.rename(raw + ".tmp", raw)
    if not os.path.exists(qcow2):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    if not os.path.exists(empty):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", empty, str(8 * TiB)], check=True)
    return raw, qcow2, empty


def best(rounds, cmd, out, after=None):
    """The fastest of N runs; cmd is a command, or a function making (or running) one."""
    results = []
    for _round in range(rounds):
        made = cmd() if callable(cmd) else cmd
        results.append(made if isinstance(made, dict) else run(made, out))
        if after is not None:
            after()
    return min(results, key=lambda r: r["seconds"])


def run(cmd, out):
    """Run cmd once; wall time, CPU of the whole process tree, peak RSS."""
    if out and os.path.exists(out):
        os.unlink(out)
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    env = dict(
        os.environ, ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false"
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    stdout = proc.stdout.read()
    status, usage = os.wait4(proc.pid, 0)[1:]
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with exit code {proc.returncode}")
    result = {
        "seconds": round(seconds, 2),
        "cpu": round(usage.ru_utime + usage.ru_stime, 2),
        # ru_maxrss of a process tree is the largest single process in it.
        "peak_rss": usage.ru_maxrss * 1024,
    }
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith(b'{"peak_rss"'):
        result["python_peak_rss"] = json.loads(lines[-1])["peak_rss"]
    return result


def check_identical(image, out):
    subprocess.run(["qemu-img", "compare", "-q", image, out], check=True)


def print_table(rows, ref_name):
    print(f"| case | ours s | {ref_name} s | time ratio | ours CPU s | {ref_name} CPU s "
          "| CPU ratio | ours peak RSS |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours, ref = row["ours"], row[ref_name]
        rss = ours.get("python_peak_rss", ours["peak_rss"])
        cpu_ratio = ours["cpu"] / ref["cpu"] if ref["cpu"] else float("nan")
        print(
            f"| {row['case']} | {ours['seconds']:.2f} | {ref['seconds']:.2f} "
            f"| {ours['seconds'] / ref['seconds']:.2f} | {ours['cpu']:.2f} | {ref['cpu']:.2f} "
            f"| {cpu_ratio:.2f} | {rss / MiB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
