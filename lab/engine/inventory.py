# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's fixed data center: one data center, one cluster, one host, three
storage domains.

Ids are made once and kept in the database, so clients that stored them (a
playbook's inventory, a test) see the same ids after a restart.
"""

from __future__ import annotations

import uuid

from lab.engine import errors, search, xml
from lab.storage import StorageDomain

DATA_CENTER = "Default"
CLUSTER = "Default"

# name, kind, description
DOMAINS = (
    ("nfs1", "file", "NFS data domain"),
    ("iscsi1", "block", "iSCSI data domain"),
    ("scratch", "file", "Scratch NFS data domain for temporary disks"),
)

HOST_FIELDS = {
    "id": search.Field(lambda h: h["id"]),
    "name": search.Field(lambda h: h["name"]),
    "address": search.Field(lambda h: h["address"]),
    "hw_id": search.Field(lambda h: h["hw_id"]),
    "status": search.Field(lambda h: "up", enum=True),
    "cluster": search.Field(lambda h: h["cluster_name"]),
    "datacenter": search.Field(lambda h: h["data_center_name"]),
}


class Inventory:
    def __init__(self, db, lab_dir: str, host):
        self.db = db
        self.lab_dir = lab_dir
        self.host = host
        with db.transaction():
            self._seed()
        self.domains: dict[str, StorageDomain] = {}
        for sd in self.db.all("SELECT * FROM storage_domains ORDER BY name"):
            domain = StorageDomain.open(lab_dir, sd["name"], sd["kind"], sd["id"])
            self.domains[sd["id"]] = domain
            if sd["path"] != domain.path:
                self.db.update("storage_domains", sd["id"], path=domain.path)

    # Data centers.

    def data_centers(self) -> list[dict]:
        return self.db.all("SELECT * FROM data_centers ORDER BY name")

    def data_center(self, dc_id: str) -> dict:
        return _found(self.db.get("data_centers", dc_id))

    def data_center_fields(self) -> dict:
        def domain_names(dc):
            rows = self.db.all(
                "SELECT name FROM storage_domains WHERE data_center_id = ?", (dc["id"],)
            )
            return [r["name"] for r in rows]

        return {
            "id": search.Field(lambda dc: dc["id"]),
            "name": search.Field(lambda dc: dc["name"]),
            "status": search.Field(lambda dc: "up", enum=True),
            "storage.name": search.Field(domain_names),
            "storage": search.Field(domain_names),
        }

    # Clusters.

    def clusters(self, dc_id: str | None = None) -> list[dict]:
        if dc_id is None:
            return self.db.all("SELECT * FROM clusters ORDER BY name")
        return self.db.all(
            "SELECT * FROM clusters WHERE data_center_id = ? ORDER BY name", (dc_id,)
        )

    def cluster(self, cluster_id: str) -> dict:
        return _found(self.db.get("clusters", cluster_id))

    def cluster_fields(self) -> dict:
        return {
            "id": search.Field(lambda c: c["id"]),
            "name": search.Field(lambda c: c["name"]),
            "datacenter": search.Field(lambda c: self.data_center(c["data_center_id"])["name"]),
        }

    # Hosts.

    def hosts(self) -> list[dict]:
        return self.db.all(
            "SELECT h.*, c.name AS cluster_name, d.name AS data_center_name "
            "FROM hosts h JOIN clusters c ON h.cluster_id = c.id "
            "JOIN data_centers d ON c.data_center_id = d.id ORDER BY h.name"
        )

    def host_row(self, host_id: str) -> dict:
        for row in self.hosts():
            if row["id"] == host_id:
                return row
        raise errors.not_found()

    # Storage domains.

    def storage_domains(self, dc_id: str | None = None) -> list[dict]:
        if dc_id is None:
            return self.db.all("SELECT * FROM storage_domains ORDER BY name")
        return self.db.all(
            "SELECT * FROM storage_domains WHERE data_center_id = ? ORDER BY name", (dc_id,)
        )

    def storage_domain(self, sd_id: str) -> dict:
        return _found(self.db.get("storage_domains", sd_id))

    def storage_domain_by_name(self, name: str) -> dict | None:
        return self.db.one("SELECT * FROM storage_domains WHERE name = ?", (name,))

    def storage_domain_fields(self) -> dict:
        return {
            "id": search.Field(lambda sd: sd["id"]),
            "name": search.Field(lambda sd: sd["name"]),
            "status": search.Field(lambda sd: "active", enum=True),
            "type": search.Field(lambda sd: "data", enum=True),
            "storage_type": search.Field(lambda sd: sd["storage_type"], enum=True),
            "datacenter": search.Field(lambda sd: self.data_center(sd["data_center_id"])["name"]),
        }

    def domain(self, sd_id: str) -> StorageDomain:
        return self.domains[sd_id]

    def render_storage_domain(self, sd: dict, parent_dc: str | None = None):
        return xml.storage_domain(sd, self.domains[sd["id"]].stats(), parent_dc)

    def summary(self) -> dict:
        return {
            "hosts": (1, 1),
            "storage_domains": (len(self.domains), len(self.domains)),
        }

    # Private helpers.

    def _seed(self):
        dc = self.db.one("SELECT * FROM data_centers WHERE name = ?", (DATA_CENTER,))
        if dc is None:
            dc = {
                "id": str(uuid.uuid4()),
                "name": DATA_CENTER,
                "description": "The lab data center",
            }
            self.db.insert("data_centers", dc)
        cluster = self.db.one("SELECT * FROM clusters WHERE name = ?", (CLUSTER,))
        if cluster is None:
            cluster = {
                "id": str(uuid.uuid4()),
                "name": CLUSTER,
                "description": "The lab cluster",
                "data_center_id": dc["id"],
            }
            self.db.insert("clusters", cluster)
        hw_id = self.db.get_meta("host_hw_id")
        if hw_id is None:
            hw_id = str(uuid.uuid4())
            self.db.set_meta("host_hw_id", hw_id)
        # The host object owns its id and address; the engine mirrors them.
        self.db.run("DELETE FROM hosts WHERE id != ?", (self.host.id,))
        self.db.run(
            "INSERT OR REPLACE INTO hosts (id, name, address, hw_id, cluster_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.host.id, self.host.name, self.host.address, hw_id, cluster["id"]),
        )
        for index, (name, kind, description) in enumerate(DOMAINS):
            if self.storage_domain_by_name(name) is None:
                self.db.insert(
                    "storage_domains",
                    {
                        "id": str(uuid.uuid4()),
                        "name": name,
                        "description": description,
                        "kind": kind,
                        "storage_type": "iscsi" if kind == "block" else "nfs",
                        "data_center_id": dc["id"],
                        "master": 1 if index == 0 else 0,
                        "path": "",
                    },
                )


def _found(row: dict | None) -> dict:
    if row is None:
        raise errors.not_found()
    return row
