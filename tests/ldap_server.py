"""A private OpenLDAP slapd for tests: temp-dir config, mdb database, free loopback port.

Usage from any test module:

    from tests import ldap_server
    from tests.ldap_server import start_slapd

    slapd = ldap_server.slapd     # make the fixture visible in this module

    def test_x(slapd):            # a running server with USERS, stopped afterwards
                                  # (slapd_module: shared by a module; slapd_tls: with TLS)
        slapd.uri                 # "ldap://127.0.0.1:PORT"
        slapd.users["alice"].dn   # "uid=alice,ou=people,dc=example,dc=org"
        slapd.stop(); slapd.start()   # same port, same data
        slapd.pause(); slapd.resume() # SIGSTOP/SIGCONT: a hung server
        slapd.binds(dn)           # how many BINDs as dn slapd has logged

    server = start_slapd(tmp_path / "ldap", tls=True)  # also .ldaps_uri and .ca_file
    ...
    server.stop()

slapd runs in the foreground (-d) as our child, so it dies with the test run; its
stats log (BIND, SRCH, STARTTLS lines) goes to `log_path`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ldap
import pytest

from tests.conftest import free_port

SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
ADMIN_DN = f"cn=admin,{BASE}"
ADMIN_PASSWORD = "admin-secret"
SERVICE_DN = f"cn=ofmipd,ou=services,{BASE}"
SERVICE_PASSWORD = "service-secret"
START_TIMEOUT = 60.0  # a loaded 2-core machine can be slow to open the mdb environment


@dataclass(frozen=True)
class User:
    uid: str
    password: str
    mail: str
    ou: str = "people"  # a sub-tree under ou=people ("staff" -> ou=staff,ou=people,...)

    @property
    def dn(self) -> str:
        where = PEOPLE if self.ou == "people" else f"ou={self.ou},{PEOPLE}"
        return f"uid={self.uid},{where}"


# "shared@example.org" belongs to two people, so a mail filter can be ambiguous; a second
# "bob" lives in ou=staff so an unescaped "bob,ou=staff" would reach a different entry.
USERS: tuple[User, ...] = (
    User("alice", "alice-pw", "alice@example.org"),
    User("bob", "bob-pw", "bob@example.org"),
    User("carol", "carol-pw", "shared@example.org"),
    User("dave", "dave-pw", "shared@example.org"),
    User("bob", "staff-bob-pw", "staffbob@example.org", ou="staff"),
    User("admin", "admin-user-pw", "admin@example.org"),
)


def ssha(password: str) -> str:
    """A {SSHA} hash made by slappasswd, as an admin would."""
    out = subprocess.run(
        ["slappasswd", "-h", "{SSHA}", "-s", password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


def make_ca_and_cert(directory: Path, name: str = "test") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it.

    Returns (ca_file, cert_file, key_file).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=ofmipd {name} test CA", "-keyout", str(ca_key), "-out", str(ca_cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca_cert, cert, key


@dataclass
class Slapd:
    """A handle on one private slapd; start() and stop() may be called repeatedly."""

    directory: Path
    port: int
    users: dict[str, User]
    all_users: tuple[User, ...]
    ldaps_port: int | None = None
    ca_file: Path | None = None
    base: str = BASE
    people: str = PEOPLE
    service_dn: str = SERVICE_DN
    service_password: str = SERVICE_PASSWORD
    service_password_file: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.service_password_file = self.directory / "service.pw"
        self.service_password_file.write_text(self.service_password + "\n")
        self.service_password_file.chmod(0o600)

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        if self.ldaps_port is None:
            raise RuntimeError("this slapd was started without tls=True")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def config(self) -> Path:
        return self.directory / "slapd.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "slapd.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        urls = [f"ldap://127.0.0.1:{self.port}/"]
        if self.ldaps_port is not None:
            urls.append(f"ldaps://127.0.0.1:{self.ldaps_port}/")
        with open(self.log_path, "ab") as log:
            # -d stats: stay in the foreground and log every operation to stderr.
            self.process = subprocess.Popen(
                [SLAPD, "-h", " ".join(urls), "-f", str(self.config), "-d", "stats"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"slapd exited during start-up:\n{self.log_tail()}")
            conn = ldap.initialize(self.uri)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 2.0)
            conn.set_option(ldap.OPT_TIMEOUT, 5.0)
            try:
                # Anonymous, so that tests counting binds per DN count only their own.
                conn.simple_bind_s("", "")
                conn.search_ext_s(BASE, ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
                return
            except ldap.LDAPError:
                time.sleep(0.1)
            finally:
                conn.unbind_ext_s()
        raise RuntimeError(f"slapd not ready within {START_TIMEOUT:g}s:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused slapd cannot handle SIGTERM
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        self._wait_port_closed()

    def _wait_port_closed(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel but never answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def binds(self, dn: str) -> int:
        """How many simple BINDs as `dn` slapd has logged (case-insensitive)."""
        needle = f'BIND dn="{dn}" method=128'.lower()
        return sum(needle in line.lower() for line in self.log_text().splitlines())

    def connections(self) -> int:
        """How many connections slapd has accepted so far."""
        return sum(" ACCEPT from " in line for line in self.log_text().splitlines())


def _ldif(users: Iterable[User]) -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
        f"cn: ofmipd\nuserPassword: {ssha(SERVICE_PASSWORD)}\n",
    ]
    sub_units = sorted({u.ou for u in users if u.ou != "people"})
    for ou in sub_units:
        entries.append(f"dn: ou={ou},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou}\n")
    for u in users:
        entries.append(
            f"dn: {u.dn}\nobjectClass: inetOrgPerson\nuid: {u.uid}\ncn: {u.uid}\nsn: {u.uid}\n"
            f"mail: {u.mail}\nuserPassword: {ssha(u.password)}\n"
        )
    return "\n".join(entries)


def _config(directory: Path, cert: tuple[Path, Path, Path] | None) -> str:
    lines = [f"include {SCHEMA_DIR / name}.schema" for name in SCHEMAS]
    lines += [
        f"pidfile {directory / 'slapd.pid'}",
        f"argsfile {directory / 'slapd.args'}",
        "modulepath /usr/lib/ldap",
        "moduleload back_mdb",
    ]
    if cert is not None:
        ca_file, cert_file, key_file = cert
        lines += [
            f"TLSCACertificateFile {ca_file}",
            f"TLSCertificateFile {cert_file}",
            f"TLSCertificateKeyFile {key_file}",
        ]
    lines += [
        "database mdb",
        "maxsize 10485760",
        f'suffix "{BASE}"',
        f'rootdn "{ADMIN_DN}"',
        f"rootpw {ssha(ADMIN_PASSWORD)}",
        f"directory {directory / 'db'}",
        # Passwords are usable for binding only; the service account may search.
        "access to attrs=userPassword by anonymous auth by self write by * none",
        "access to * by * read",
    ]
    return "\n".join(lines) + "\n"


def start_slapd(
    directory: Path, *, tls: bool = False, users: Iterable[User] = USERS, start: bool = True
) -> Slapd:
    """Configure, load and start a private slapd in `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir(exist_ok=True)
    users = tuple(users)
    cert = make_ca_and_cert(directory / "tls") if tls else None
    (directory / "slapd.conf").write_text(_config(directory, cert))
    (directory / "data.ldif").write_text(_ldif(users))
    subprocess.run(
        ["slapadd", "-f", str(directory / "slapd.conf"), "-l", str(directory / "data.ldif")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = Slapd(
        directory=directory,
        port=free_port(),
        ldaps_port=free_port() if tls else None,
        ca_file=cert[0] if cert else None,
        users={u.uid: u for u in users if u.ou == "people"},
        all_users=users,
    )
    if start:
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A running private slapd with USERS; stopped and removed after the test."""
    server = start_slapd(tmp_path / "slapd")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slapd_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One running slapd shared by a module's tests that neither stop nor change it."""
    server = start_slapd(tmp_path_factory.mktemp("slapd-module"))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def slapd_tls(tmp_path: Path) -> Iterator[Slapd]:
    """Like `slapd`, with a test CA, StartTLS on .uri and implicit TLS on .ldaps_uri."""
    server = start_slapd(tmp_path / "slapd-tls", tls=True)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


__all__ = [
    "ADMIN_DN",
    "BASE",
    "PEOPLE",
    "SERVICE_DN",
    "USERS",
    "Slapd",
    "User",
    "make_ca_and_cert",
    "slapd",
    "slapd_module",
    "slapd_tls",
    "start_slapd",
]
