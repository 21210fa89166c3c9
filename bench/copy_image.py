# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Copy a local image into a new local qcow2 through the streaming core.

Both images are served by qemu-nbd, and the copy runs over NBD, exactly as
an upload's source side does. Prints one JSON line: the copy's stats and the
peak RSS of this process.

    python bench/copy_image.py SRC DST [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".collections"))

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _qemu


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
    args = parser.parse_args()

    info = _qemu.info(args.src)
    _qemu.create(args.dst, "qcow2", info["virtual-size"])
    with (
        _qemu.serve(args.src, fmt=info["format"], readonly=True) as src_export,
        _qemu.serve(args.dst, fmt="qcow2", readonly=False) as dst_export,
    ):
        src = _copy.NbdEndpoint(src_export.url, allocation_depth=info["format"] != "raw")
        dst = _copy.NbdEndpoint(dst_export.url, is_zero=True)
        try:
            stats = _copy.copy(src, dst, workers=args.workers)
        finally:
            src.close()
            dst.close()
    result = stats.as_dict()
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
