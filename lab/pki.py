# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's certificate authority.

A small CA made with the ``openssl`` command line, signing the certificates of
the engine, the imageio daemons and qemu. The certificates are accepted both by
OpenSSL (Python's ssl, libcurl in ovirtsdk4) and by GnuTLS (qemu), which checks
key usage and basic constraints strictly.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CA_SUBJECT = "/O=thinair.ovirt lab/CN=thinair.ovirt lab CA"
KEY_BITS = 2048
CA_DAYS = 3650
LEAF_DAYS = 825

CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

# qemu's tls-creds-x509 expects these names in the directory it is given.
QEMU_CA = "ca-cert.pem"
QEMU_ROLES = ("server", "client")


class PkiError(Exception):
    """openssl failed or the request cannot be served."""


class Pki:
    """A CA living in one directory; leaf pairs are kept beside it by name."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.ca_cert = os.path.join(self.directory, CA_CERT)
        self.ca_key = os.path.join(self.directory, CA_KEY)
        with self._locked():
            if not (os.path.exists(self.ca_cert) and os.path.exists(self.ca_key)):
                self._create_ca()

    def issue(
        self,
        name: str,
        hosts=("localhost", "127.0.0.1"),
        server: bool = True,
        client: bool = False,
    ) -> tuple[str, str]:
        """Return (cert_path, key_path) for name, signing a new pair if needed.

        An existing pair is reused when it was issued for the same hosts and
        usages, so a restarted lab keeps the certificates clients already trust.
        """
        if not name or os.sep in name or name.startswith(".") or name.startswith("ca-"):
            raise PkiError(f"Invalid certificate name {name!r}: use a plain file name")
        if not (server or client):
            raise PkiError(f"Certificate {name!r} needs server or client usage")
        hosts = tuple(hosts)
        if not hosts:
            raise PkiError(f"Certificate {name!r} needs at least one host name or address")

        cert = os.path.join(self.directory, name + "-cert.pem")
        key = os.path.join(self.directory, name + "-key.pem")
        spec_path = os.path.join(self.directory, name + ".json")
        spec = {"hosts": list(hosts), "server": server, "client": client}

        with self._locked():
            if _same_spec(spec_path, spec) and os.path.exists(cert) and os.path.exists(key):
                return cert, key
            self._sign_leaf(name, hosts, server, client, cert, key)
            _write_atomic(spec_path, json.dumps(spec).encode(), 0o644)
        return cert, key

    def qemu_dir(self, role: str, directory: str) -> str:
        """Lay out directory for qemu's ``tls-creds-x509,dir=...`` and return it.

        role "server" gives server-cert.pem/server-key.pem, "client" gives
        client-cert.pem/client-key.pem; both get ca-cert.pem.
        """
        if role not in QEMU_ROLES:
            raise PkiError(f"Invalid qemu TLS role {role!r}: use 'server' or 'client'")
        cert, key = self.issue("qemu-" + role, server=(role == "server"), client=(role == "client"))
        os.makedirs(directory, exist_ok=True)
        _copy(self.ca_cert, os.path.join(directory, QEMU_CA), 0o644)
        _copy(cert, os.path.join(directory, role + "-cert.pem"), 0o644)
        _copy(key, os.path.join(directory, role + "-key.pem"), 0o600)
        return directory

    # Private helpers.

    @contextlib.contextmanager
    def _locked(self):
        # Several lab processes (engine, tests) may share one CA directory.
        with open(os.path.join(self.directory, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _create_ca(self):
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".ca-") as tmp:
            key = os.path.join(tmp, "key.pem")
            cert = os.path.join(tmp, "cert.pem")
            ext = os.path.join(tmp, "ext.cnf")
            _write_config(ext, "v3_ca", CA_EXTENSIONS)
            _generate_key(key)
            _openssl(
                "req", "-new", "-x509", "-sha256",
                "-key", key,
                "-subj", CA_SUBJECT,
                "-days", str(CA_DAYS),
                "-set_serial", _serial(),
                "-config", ext,
                "-extensions", "v3_ca",
                "-out", cert,
            )  # fmt: skip
            os.chmod(cert, 0o644)
            # The key goes last: its presence marks a complete CA.
            os.replace(cert, self.ca_cert)
            os.replace(key, self.ca_key)

    def _sign_leaf(self, name, hosts, server, client, cert_path, key_path):
        usages = []
        if server:
            usages.append("serverAuth")
        if client:
            usages.append("clientAuth")
        extensions = (
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            f"extendedKeyUsage = {', '.join(usages)}\n"
            f"subjectAltName = {_subject_alt_names(hosts)}\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid, issuer\n"
        )
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".leaf-") as tmp:
            key = os.path.join(tmp, "key.pem")
            csr = os.path.join(tmp, "req.pem")
            cert = os.path.join(tmp, "cert.pem")
            ext = os.path.join(tmp, "ext.cnf")
            _write_config(ext, "v3_leaf", extensions)
            _generate_key(key)
            _openssl(
                "req", "-new", "-sha256",
                "-key", key,
                "-subj", f"/O=thinair.ovirt lab/CN={_subject_name(name, hosts)}",
                "-out", csr,
            )  # fmt: skip
            _openssl(
                "x509", "-req", "-sha256",
                "-in", csr,
                "-CA", self.ca_cert,
                "-CAkey", self.ca_key,
                "-set_serial", _serial(),
                "-days", str(LEAF_DAYS),
                "-extfile", ext,
                "-extensions", "v3_leaf",
                "-out", cert,
            )  # fmt: skip
            os.chmod(cert, 0o644)
            os.replace(key, key_path)
            os.replace(cert, cert_path)


def _subject_alt_names(hosts) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not host or any(c in host for c in ",\n/=") or host != host.strip():
                raise PkiError(f"Invalid host name {host!r} for a certificate") from None
            names.append(f"DNS:{host}")
    return ", ".join(names)


def _subject_name(name, hosts) -> str:
    # The common name is informational only (clients match the SAN), but a
    # DNS name there reads better in logs than the file name.
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host
    return name


def _serial() -> str:
    # Random serials: reissuing a certificate must never repeat one, or NSS and
    # GnuTLS caches may confuse the old and the new certificate.
    return f"0x{secrets.randbits(119) | 1 << 119:x}"


def _generate_key(path):
    _openssl(
        "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}", "-out", path
    )
    os.chmod(path, 0o600)


def _write_config(path, section, body):
    # Standalone config: do not depend on the system openssl.cnf defaults.
    with open(path, "w") as f:
        f.write(f"[req]\ndistinguished_name = dn\n[dn]\n[{section}]\n{body}")


def _openssl(*args):
    try:
        subprocess.run(
            ["openssl", *args],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    except FileNotFoundError:
        raise PkiError("openssl command not found: install the openssl package") from None
    except subprocess.CalledProcessError as e:
        raise PkiError(
            f"openssl {args[0]} failed (exit {e.returncode}): {e.stderr.decode(errors='replace')}"
        ) from None


def _same_spec(path, spec) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == spec
    except (OSError, ValueError):
        return False


def _write_atomic(path, data, mode):
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _copy(src, dst, mode):
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, dst)
