# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Copy a local image into a new local qcow2 through the streaming core.

By default both images are served by qemu-nbd and the copy runs over NBD;
with --direct the core reads and writes the files itself where it can
(_image.open_endpoint and create_endpoint, what uploads and downloads use).
With --qemu-img, qemu-img convert copies between the same two qemu-nbd
exports instead of the core: what moving the data over NBD costs C code.
With --delay MS the source export is read through a proxy that delays what
it forwards by MS milliseconds each way (bench/delay_proxy.py), as a remote
export would be; --delay 0 goes through the proxy without delay (what the
proxy itself costs). Prints one JSON line: the copy's stats and the peak RSS of
this process.

    python bench/copy_image.py SRC DST [--workers N] [--direct | --qemu-img] [--delay MS]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".collections"))

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _copy,
    _image,
    _nbd_endpoint,
    _nbd_url,
    _qemu_img,
    _qemu_nbd,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--workers", type=int, default=_copy.DEFAULT_WORKERS)
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("--qemu-img", action="store_true")
    parser.add_argument("--delay", type=float, default=None)
    args = parser.parse_args()

    info = _qemu_img.info(args.src)
    if args.direct:
        with (
            _image.open_endpoint(args.src, info["format"]) as src,
            _image.create_endpoint(args.dst, "qcow2", info["virtual-size"]) as dst,
        ):
            stats = _copy.copy(src, dst, workers=args.workers)
    else:
        stats = copy_over_nbd(args.src, args.dst, info, args.workers, args.qemu_img, args.delay)
    # peak_rss first: bench/run.py reads it from such a line.
    print(json.dumps({"peak_rss": peak_rss(), **stats.as_dict()}))


def copy_over_nbd(src_image, dst_image, info, workers, qemu_img=False, delay=None):
    _qemu_img.create(dst_image, "qcow2", info["virtual-size"])
    with (
        _qemu_nbd.serve(src_image, fmt=info["format"], readonly=True) as src_export,
        _qemu_nbd.serve(dst_image, fmt="qcow2", readonly=False) as dst_export,
        delayed(src_export, delay) as src_url,
    ):
        if qemu_img:
            stats = _copy.Stats(info["virtual-size"])
            subprocess.run(
                ["qemu-img", "convert", "-n", "--target-is-zero", "-W", "-m", str(workers),
                 "-f", "raw", "-O", "raw", src_url, dst_export.url],
                check=True,
            )  # fmt: skip
            stats.seconds = time.monotonic() - stats.start
            return stats
        src = _nbd_endpoint.NbdEndpoint(src_url, allocation_depth=info["format"] != "raw")
        dst = _nbd_endpoint.NbdEndpoint(dst_export.url, is_zero=True)
        try:
            return _copy.copy(src, dst, workers=workers)
        finally:
            src.close()
            dst.close()


@contextlib.contextmanager
def delayed(export, delay):
    """The URL reading export, through a delaying proxy when delay is set."""
    if delay is None:
        yield export.url
        return
    sock = export.socket + ".delayed"
    proxy = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "delay_proxy.py"), sock, export.socket, str(delay)],
        stdout=subprocess.PIPE,
    )
    try:
        if proxy.stdout.readline().strip() != b"ready":
            raise RuntimeError("the delaying proxy did not start")
        yield _nbd_url.format_url(_nbd_url.Address("unix", path=sock, export=export.export_name))
    finally:
        proxy.terminate()
        proxy.wait()
        proxy.stdout.close()


if __name__ == "__main__":
    main()
