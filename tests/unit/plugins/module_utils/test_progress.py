# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The progress record a module writes for the role that follows it."""

from __future__ import annotations

import json
import os
import stat
import time

from ansible_collections.thinair.ovirt.plugins.module_utils import _progress


class Stats:
    def __init__(self, size, done, start):
        self.size = size
        self.done = done
        self.start = start


def read(path):
    with open(path) as f:
        return json.load(f)


def test_phases_and_updates(tmp_path):
    path = str(tmp_path / "progress.json")
    progress = _progress.Progress(path, description="disk.qcow2", interval=3600)
    progress.set_phase("uploading", size=1000)
    record = read(path)
    assert (record["description"], record["phase"], record["size"], record["done"]) == (
        "disk.qcow2",
        "uploading",
        1000,
        0,
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # Updates within the interval are not written; a phase always is.
    progress.update(Stats(1000, 250, time.monotonic() - 1))
    assert read(path)["done"] == 0
    progress.set_phase("finalizing")
    record = read(path)
    assert (record["phase"], record["done"], record["percent"]) == ("finalizing", 250, 25.0)
    assert record["rate"] > 0 and record["eta"] > 0

    progress.remove()
    assert os.listdir(tmp_path) == []


def test_updates_at_the_interval(tmp_path):
    path = str(tmp_path / "progress.json")
    progress = _progress.Progress(path, interval=0)
    progress.update(Stats(4, 4, time.monotonic() - 1))
    record = read(path)
    assert (record["percent"], record["eta"]) == (100.0, None)


def test_without_a_path_nothing_is_written(tmp_path):
    progress = _progress.Progress(None)
    progress.set_phase("uploading", size=10)
    progress.remove()
    assert progress.record()["phase"] == "uploading"
