# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The data path alone: move an image to or from an open image transfer.

    python bench/data_path.py ours|imageio|ceiling upload IMAGE TRANSFER_URL CA_FILE
    python bench/data_path.py ours|imageio download OUTPUT TRANSFER_URL CA_FILE [FORMAT]

"ours" is the collection's module_utils (_image.open_endpoint and
create_endpoint on the local side: the file itself for raw and plain qcow2
images, qemu-nbd otherwise; our imageio client on the other); "imageio" is
ovirt_imageio.client, what ovirt-img runs. Both use 4 connections and skip
zeros on the new disk. "ceiling" sends the image's data extents as ours
does, from memory, reading nothing: what the server and the connections
allow. Downloads write FORMAT, qcow2 by default. Prints one JSON line with
this process's peak RSS.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".collections"))

from copy_image import peak_rss

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _image, _imageio

WORKERS = 4


def ours(direction, image, url, ca_file, fmt):
    if direction == "upload":
        # The format is probed once, as a module does when it inspects the
        # image; the image is read as disk_upload reads it.
        with _image.open_endpoint(image, None, page_cache=False) as src:
            dst = _imageio.ImageioEndpoint(url, ca_file=ca_file, is_zero=True)
            try:
                _copy.copy(src, dst, workers=WORKERS)
            finally:
                dst.close()
    else:
        src = _imageio.ImageioEndpoint(url, ca_file=ca_file)
        try:
            with _image.create_endpoint(image, fmt, src.size) as dst:
                _copy.copy(src, dst, workers=WORKERS)
        finally:
            src.close()


class FromMemory:
    """An image's extents as a copy source whose data is whatever the copy's
    buffers hold (random bytes, written once a buffer): nothing is read."""

    def __init__(self, endpoint, filled=None):
        self._endpoint = endpoint
        self._filled = set() if filled is None else filled
        self.size = endpoint.size
        self.max_connections = endpoint.max_connections
        self.max_request = endpoint.max_request

    def clone(self):
        return FromMemory(self._endpoint.clone(), self._filled)

    def extents(self, offset=0, length=None):
        return self._endpoint.extents(offset, length)

    def readinto(self, offset, buf):
        if id(buf.obj) not in self._filled:
            self._filled.add(id(buf.obj))
            whole = memoryview(buf.obj)
            whole[:] = os.urandom(len(whole))

    def close(self):
        self._endpoint.close()


def ceiling(direction, image, url, ca_file, fmt):
    with _image.open_endpoint(image, None) as src:
        dst = _imageio.ImageioEndpoint(url, ca_file=ca_file, is_zero=True)
        try:
            _copy.copy(FromMemory(src), dst, workers=WORKERS)
        finally:
            dst.close()


def imageio(direction, image, url, ca_file, fmt):
    from ovirt_imageio import client

    if direction == "upload":
        client.upload(image, url, ca_file, max_workers=WORKERS, disk_is_zero=True)
    else:
        client.download(url, image, ca_file, fmt=fmt, max_workers=WORKERS)


def main():
    client, direction, image, url, ca_file = sys.argv[1:6]
    fmt = sys.argv[6] if len(sys.argv) > 6 else "qcow2"
    {"ours": ours, "imageio": imageio, "ceiling": ceiling}[client](
        direction, image, url, ca_file, fmt
    )
    print(json.dumps({"peak_rss": peak_rss()}))


if __name__ == "__main__":
    main()
