# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Benchmarks, each against its reference measured in the same run.

    .venv/bin/python bench/run.py copy [--dir DIR] [--rounds N]

copy: a local image into a new local qcow2 through the streaming core
(qemu-nbd on both sides, NBD in between) against `qemu-img convert` of the
same image: (a) 6 GiB with 1.5 GiB of random data in 64 MiB runs, as raw and
as qcow2, (b) an empty 8 TiB qcow2. Prints wall time, CPU seconds
(user+sys, child processes included), peak RSS and the ratios, as a table
ready for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

DATA_IMAGE_SIZE = 6 * GiB
DATA_RUN = 64 * MiB
DATA_RUNS = 24  # 1.5 GiB


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("suite", choices=["copy"])
    parser.add_argument("--dir", default=os.path.join(ROOT, ".cache", "bench"))
    parser.add_argument("--rounds", type=int, default=2, help="best of N runs of each command")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = copy_suite(args.dir, args.rounds)
    print_table(rows)
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
        row = {"case": name}
        row["ours"] = best(rounds, [*ours, image, out], out)
        row["qemu-img"] = best(
            rounds, ["qemu-img", "convert", "-f", fmt, "-O", "qcow2", image, out], out
        )
        check_identical(image, out)
        rows.append(row)
    return rows


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


def best(rounds, cmd, out):
    results = [run(cmd, out) for _round in range(rounds)]
    return min(results, key=lambda r: r["seconds"])


def run(cmd, out):
    """Run cmd once; wall time, CPU of the whole process tree, peak RSS."""
    if os.path.exists(out):
        os.unlink(out)
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
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
    if stdout.strip():
        own = json.loads(stdout.splitlines()[-1])
        result["python_peak_rss"] = own["peak_rss"]
    return result


def check_identical(image, out):
    subprocess.run(["qemu-img", "compare", "-q", image, out], check=True)


def print_table(rows):
    print(
        "| case | ours s | qemu-img s | time ratio | ours CPU s | qemu-img CPU s | ours peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours, ref = row["ours"], row["qemu-img"]
        rss = ours.get("python_peak_rss", ours["peak_rss"])
        print(
            f"| {row['case']} | {ours['seconds']:.2f} | {ref['seconds']:.2f} "
            f"| {ours['seconds'] / ref['seconds']:.2f} | {ours['cpu']:.2f} | {ref['cpu']:.2f} "
            f"| {rss / MiB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
