# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The engine wrapper against the lab's engine: logging in, looking up,
sending again what the engine failed, creating, moving and removing disks."""

from __future__ import annotations

import uuid

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import _engine

pytestmark = pytest.mark.usefixtures("before")

MiB = 1024**2
SPEC = {
    "format": "cow",
    "sparse": True,
    "provisioned_size": 64 * MiB,
    "backup": "none",
    "content_type": "data",
}


@pytest.fixture
def engine(lab):
    engine = _engine.Engine(lab.auth(), timeout=60, poll_interval=0.2)
    yield engine
    engine.close()


def test_wrong_password(lab):
    with pytest.raises(_engine.EngineError, match="cannot connect to the engine: authentication"):
        _engine.Engine(lab.auth(password="wrong"))


def test_no_credentials(lab):
    with pytest.raises(_engine.EngineError, match="no credentials for the engine"):
        _engine.Engine({"url": lab.engine_url, "ca_file": lab.ca_file})


def test_untrusted_certificate(lab):
    # Without the lab's CA, the system's CAs do not know the engine.
    with pytest.raises(_engine.EngineError, match=r"is not trusted .* set auth\.ca_file"):
        _engine.Engine(lab.auth(ca_file=None))


def test_unknown_storage_domain(engine):
    with pytest.raises(_engine.EngineError) as e:
        engine.storage_domain("nowhere")
    assert "storage domain 'nowhere' not found; the engine has: " in str(e.value)
    assert "nfs1" in str(e.value)


def test_lookup_answered_503_is_sent_again(lab, engine):
    lab.hooks.fail("/ovirt-engine/api/storagedomains", 503, method="GET", count=2)
    assert engine.storage_domain("nfs1").name == "nfs1"
    assert len(engine.retries) == 2
    assert all(r.startswith("look up storage domain nfs1: ") for r in engine.retries)
    assert all(r.endswith("; sent again") for r in engine.retries)


def test_creation_refused_is_not_sent_again(lab, engine):
    # Creating a disk twice would make two: a 5xx on it is the caller's to handle.
    lab.hooks.fail("/ovirt-engine/api/disks", 500, method="POST", detail="engine trouble")
    name = f"engine-test-{uuid.uuid4().hex[:8]}"
    with pytest.raises(_engine.EngineError) as e:
        engine.create_disk(SPEC, "nfs1", name)
    assert str(e.value) == f"cannot create disk {name} on nfs1: [engine trouble]"
    assert engine.retries == []


def test_disk_created_moved_and_removed(lab, engine):
    name = f"engine-test-{uuid.uuid4().hex[:8]}"
    disk = engine.create_disk(SPEC, "nfs1", name, description="made by a test")
    assert str(disk.status) == "ok"
    assert engine.disk(name=name).id == disk.id
    assert engine.disk_domain_name(disk) == "nfs1"

    correlation_id = str(uuid.uuid4())
    engine.move_disk(disk.id, "iscsi1", correlation_id)
    seen = []
    engine.wait_jobs(correlation_id, f"move disk {name}", on_progress=seen.append)
    assert engine.disk_domain_name(engine.get_disk(disk.id)) == "iscsi1"
    assert lab.hooks.volume(disk.id)["domain"] == "iscsi1"

    engine.remove_disk(disk.id)
    assert engine.disk(name=name) is None


def test_failed_move_job(lab, engine):
    name = f"engine-test-{uuid.uuid4().hex[:8]}"
    disk = engine.create_disk(SPEC, "nfs1", name)
    try:
        lab.hooks.fail("/copy", method="MOVE", status=500)
        correlation_id = str(uuid.uuid4())
        engine.move_disk(disk.id, "iscsi1", correlation_id)
        with pytest.raises(_engine.JobFailed, match=f"cannot move disk {name}: .* ended failed"):
            engine.wait_jobs(correlation_id, f"move disk {name}")
        assert engine.disk_domain_name(engine.wait_disk_ok(disk.id)) == "nfs1"
    finally:
        engine.remove_disk(disk.id)


def test_deadline_backs_off_up_to_the_poll_interval():
    deadline = _engine.Deadline(timeout=10, poll_interval=0.2)
    pauses = []
    for _round in range(6):
        pauses.append(deadline._pause)
        deadline.sleep()
    assert pauses[0] == _engine.FIRST_POLL
    assert pauses == sorted(pauses) and pauses[-2:] == [0.2, 0.2]
    assert not deadline.expired()


def test_deadline_sleeps_no_further_than_its_end():
    deadline = _engine.Deadline(timeout=0.3, poll_interval=5)
    while not deadline.expired():
        deadline.sleep()
    assert -0.05 < deadline.left() <= 0
