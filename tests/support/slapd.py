"""A real OpenLDAP ``slapd`` for tests, run as the current user on a free loopback port.

Debian's ``slapd`` and ``ldap-utils`` (scripts/apt-deps) are required: a missing binary
is a :class:`HarnessError` (a failure), never a skip. Each server gets a directory of its
own holding a ``slapd.conf`` (the static format: no cn=config tree to bootstrap), an
mdb database and its log. The ``memberof`` overlay is loaded, so a user entry shows
its groups in ``memberOf`` as Active Directory does, and a group search by ``member``
works too.

    with Slapd(tmp) as ldap:
        ldap.add(ldif)                  # ldapadd as the root DN
        ldap.modify(ldif)               # ldapmodify
        ldap.stop(); ldap.start()       # the same port and data: the directory "down"

The org every directory test uses is :data:`BASE` with people under ``ou=people`` and
groups under ``ou=groups``; :data:`READER_DN` / :data:`READER_PASSWORD` is a plain user
the service binds as (never the root DN).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.certs import TestCA
from tests.support.ports import free_port
from tests.support.procs import HarnessError, terminate

__all__ = [
    "BASE",
    "READER_DN",
    "READER_PASSWORD",
    "Slapd",
    "group_ldif",
    "org_ldif",
    "person_ldif",
]

LOOPBACK = "127.0.0.1"
BASE = "dc=example,dc=com"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PASSWORD = "root-secret"
READER_DN = f"cn=reader,{BASE}"
READER_PASSWORD = "reader-secret"
_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
_MODULES = "/usr/lib/ldap"


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise HarnessError(
            f"{name} is not installed: the directory tests need Debian's slapd and ldap-utils"
            " (scripts/apt-deps installs them as root)"
        )
    return found


def person_ldif(uid: str, department: str, *, cn: str | None = None) -> str:
    return (
        f"dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
        f"cn: {cn or uid}\nsn: {uid}\ndepartmentNumber: {department}\n\n"
    )


def group_ldif(name: str, members: list[str]) -> str:
    lines = [f"dn: cn={name},ou=groups,{BASE}", "objectClass: groupOfNames", f"cn: {name}"]
    # The reader is in every group: groupOfNames needs a member, even when a test moves
    # the last person out.
    lines += [f"member: uid={m},ou=people,{BASE}" for m in members] + [f"member: {READER_DN}"]
    return "\n".join(lines) + "\n\n"


def org_ldif() -> str:
    """The base entries and the reader; people and groups are added by each test."""
    return (
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n"
        f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n"
        f"dn: {READER_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
        f"cn: reader\nsn: reader\nuserPassword: {READER_PASSWORD}\n\n"
    )


class Slapd:
    """One real slapd; ``stop()`` then ``start()`` keeps the port and the data."""

    def __init__(self, workdir: Path, *, tls: bool = False, tls_ips: tuple[str, ...] = (LOOPBACK,)
                 ) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.port = free_port()
        # tls: a certificate from a throwaway CA (ca_path), StartTLS on ldap:// and
        # an ldaps:// port too (ldaps_url)
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        self.tls_ips = tls_ips  # the IPs the certificate names (its DNS name: localhost)
        self.ca_path = self.workdir / "ca.crt"
        self.log_path = self.workdir / "slapd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._loaded = False
        self._conf = self.workdir / "slapd.conf"

    @property
    def url(self) -> str:
        return f"ldap://{LOOPBACK}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{LOOPBACK}:{self.tls_port}"

    def _tls_lines(self) -> str:
        if not self.tls:
            return ""
        ca = TestCA("slapd-test-ca")
        ca.write(self.ca_path)
        cert, key = ca.issue("localhost", server=True, ips=self.tls_ips).write(
            self.workdir, "slapd"
        )
        return (
            f"TLSCACertificateFile {self.ca_path}\nTLSCertificateFile {cert}\n"
            f"TLSCertificateKeyFile {key}\n"
        )

    def _config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        includes = "\n".join(f"include /etc/ldap/schema/{s}.schema" for s in _SCHEMAS)
        conf = self._conf
        conf.write_text(
            f"{includes}\n"
            f"pidfile {self.workdir}/slapd.pid\nargsfile {self.workdir}/slapd.args\n"
            f"modulepath {_MODULES}\nmoduleload back_mdb\nmoduleload memberof\n"
            f"{self._tls_lines()}"
            "database mdb\nmaxsize 10485760\n"
            f'suffix "{BASE}"\nrootdn "{ROOT_DN}"\nrootpw {ROOT_PASSWORD}\n'
            f"directory {data}\n"
            "overlay memberof\n"
            # Anonymous binds see nothing: the service must bind as the reader.
            "access to attrs=userPassword by anonymous auth by * none\n"
            "access to * by users read by anonymous auth\n"
        )
        return conf

    def start(self) -> Slapd:
        binary = _binary("slapd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self._config() if not (self.workdir / "slapd.conf").exists() else self._conf
        log = self.log_path.open("ab")
        try:
            # -d 0: stay in the foreground (terminate() can stop it), log nothing extra.
            self._proc = subprocess.Popen(
                [binary, "-f", str(conf), "-h", self._listen(), "-d", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + 20
        while not self._accepts():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = self.log_path.read_text(errors="replace")[-3000:]
                raise HarnessError(f"slapd did not start:\n{text}")
            time.sleep(0.02)
        if not self._loaded:
            self._loaded = True
            self.add(org_ldif())
        return self

    def _listen(self) -> str:
        return f"{self.url}/ {self.ldaps_url}/" if self.tls else f"{self.url}/"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a paused slapd cannot take SIGTERM
            terminate(self._proc, grace=10)
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def _tool(self, tool: str, ldif: str, *extra: str) -> None:
        out = subprocess.run(
            [_binary(tool), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD, *extra],
            input=ldif.encode(), capture_output=True, timeout=30,
        )  # fmt: skip
        if out.returncode != 0:
            raise HarnessError(f"{tool} failed ({out.returncode}): {out.stderr.decode()}")

    def add(self, ldif: str) -> None:
        self._tool("ldapadd", ldif)

    def modify(self, ldif: str) -> None:
        self._tool("ldapmodify", ldif)

    def __enter__(self) -> Slapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
