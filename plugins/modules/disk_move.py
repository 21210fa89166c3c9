#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_move
short_description: Move an oVirt disk to another storage domain, live when its VM runs
version_added: 0.1.0
description:
  - Asks the engine to move a disk to another storage domain and waits for the engine's job,
    followed by its correlation id, then for the disk to be C(ok) on the target.
  - The engine decides how. A disk of a running VM moves by live storage migration (the VM
    must be C(up) or C(paused)), and the VM keeps running while its data is mirrored to the target,
    then switches to it. Any other disk is copied, then removed from its source.
  - A disk whose data comes from an C(external_disk) stops reading it once moved.
  - Idempotent, a disk already on the target domain is left alone. A failed move leaves the disk
    on its source; the module tries again (I(retries)), and running the task again retries it
    too.
extends_documentation_fragment:
  - thinair.ovirt._engine
options:
  name:
    description:
      - Name (alias) of the disk. Give I(name) or I(disk_id).
    type: str
  disk_id:
    description:
      - Id of the disk.
    type: str
  storage_domain:
    description:
      - Name of the storage domain to move the disk to.
    type: str
    required: true
  correlation_id:
    description:
      - Correlation id of the engine's job, to find it in the engine's events and jobs. A
        random one by default.
    type: str
  retries:
    description:
      - How many times a move whose job failed is asked for again. A failure can be passing, for
        example a VM that has just lost and regained its external disk's NBD server reconnects
        to it within seconds.
    type: int
    default: 2
  retry_delay:
    description:
      - Seconds between a failed move and the next try.
    type: float
    default: 10.0
  progress_file:
    description:
      - Path on the node where the module keeps a progress record while the move runs (phase
        C(moving), percent done as the engine reports it), for a role to read when the module
        runs with C(async). See docs/progress.md.
    type: path
notes:
  - Check mode tells whether the disk would move and changes nothing.
  - The move is the engine's, and stopping the task does not stop it. I(timeout) is how long the
    task waits for it.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: Move a running VM's disk to its final storage domain
  thinair.ovirt.disk_move:
    auth: "{{ ovirt_auth }}"
    name: vm1-disk1
    storage_domain: data1
  register: moved
"""

RETURN = r"""
disk:
  description: The disk after the move.
  returned: always
  type: dict
  sample: {"id": "5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7", "name": "vm1-disk1",
           "status": "ok", "storage_domain": "data1", "source": "scratch"}
job:
  description: The engine's job that moved the disk.
  returned: when the disk moved
  type: dict
  sample: {"id": "b8f4d0a2-7c43-4e1d-9a57-2f0c6c1d9e3f", "status": "finished",
           "description": "Migrating Disk vm1-disk1 from scratch to data1 of VM vm1",
           "correlation_id": "0b1f6f38-0ad5-43a4-8b4b-1f1a8a0c7f5d"}
elapsed:
  description: Seconds from the request to the disk being C(ok) on the target.
  returned: when the disk moved
  type: float
  sample: 12.3
attempts:
  description: How many moves were asked for, 1 unless one failed.
  returned: when the disk moved
  type: int
  sample: 1
failed_tries:
  description: Why each try that failed failed, before the one that moved the disk.
  returned: when the disk moved
  type: list
  elements: str
  sample: []
"""

import time
import uuid

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _common, _engine, _progress


class Percent:
    """What _progress.Progress.update reads, from the engine's percent done."""

    def __init__(self, size, start):
        self.size = size
        self.done = 0
        self.start = start


def move(module, engine):
    params = module.params
    name = params["name"] or params["disk_id"]
    disk = engine.disk(disk_id=params["disk_id"], name=params["name"])
    if disk is None:
        module.fail_json(msg=f"disk {name} not found")
    target = params["storage_domain"]
    engine.storage_domain(target)
    what = f"move disk {name} to {target}"
    # A disk that is locked (by an earlier move, say) settles first.
    disk = engine.wait_disk_ok(disk.id, what=what)
    source = engine.disk_domain_name(disk)
    result = {"id": disk.id, "name": disk.alias, "status": "ok", "storage_domain": source}
    if source == target:
        return {"changed": False, "disk": result}
    if module.check_mode:
        return {"changed": True, "disk": dict(result, storage_domain=target, source=source)}

    progress = _progress.Progress(params["progress_file"], description=name)
    started = time.monotonic()
    stats = Percent(disk.provisioned_size or 0, started)

    def on_progress(percent):
        stats.done = stats.size * percent // 100
        progress.update(stats)

    attempts = params["retries"] + 1
    # The words of each failed try; not warnings, which a role reading the
    # result of an async run could not decode.
    failed_tries = []
    correlation_id = params["correlation_id"] or str(uuid.uuid4())
    try:
        progress.set_phase("moving", size=stats.size)
        for attempt in range(1, attempts + 1):
            engine.move_disk(disk.id, target, correlation_id)
            try:
                jobs = engine.wait_jobs(correlation_id, what, on_progress=on_progress)
                break
            except _engine.JobFailed as e:
                if attempt == attempts:
                    if failed_tries:
                        raise _engine.JobFailed(f"{e}; {attempt} tries failed") from e
                    raise
                failed_tries.append(str(e))
            # The failed job leaves the disk on its source, unlocked.
            engine.wait_disk_ok(disk.id, what=what)
            time.sleep(params["retry_delay"])
            correlation_id = str(uuid.uuid4())
        disk = engine.wait_disk_ok(disk.id, what=what)
    finally:
        progress.remove()
    now = engine.disk_domain_name(disk)
    if now != target:
        module.fail_json(msg=f"cannot {what}: the engine's job ended but the disk is on {now}")
    job = jobs[-1]
    return {
        "changed": True,
        "disk": dict(result, storage_domain=now, source=source),
        "job": {
            "id": job.id,
            "status": job.status.value,
            "description": job.description,
            "correlation_id": correlation_id,
        },
        "elapsed": round(time.monotonic() - started, 3),
        "attempts": attempt,
        "failed_tries": failed_tries,
    }


def main():
    module = AnsibleModule(
        argument_spec=_common.argument_spec(
            name={"type": "str"},
            disk_id={"type": "str"},
            storage_domain={"type": "str", "required": True},
            correlation_id={"type": "str"},
            progress_file={"type": "path"},
            retries={"type": "int", "default": 2},
            retry_delay={"type": "float", "default": 10.0},
        ),
        required_one_of=[("name", "disk_id")],
        mutually_exclusive=[("name", "disk_id")],
        supports_check_mode=True,
    )
    _engine.run_module(module, lambda engine: move(module, engine))


if __name__ == "__main__":
    main()
