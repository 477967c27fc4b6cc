"""Cross-check the PROXY parser against headers written by a real haproxy (Debian 2.6)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ofmipd.identity import ClientIdentity
from ofmipd.proxy import (
    LOCAL,
    PROXY,
    UNSPEC,
    ProxyHeader,
    apply_proxy,
    parse_proxy_header,
    read_proxy_header,
)
from tests.conftest import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PAYLOAD = b"EHLO client.example\r\nQUIT\r\n"

Starter = Callable[[str, int, str], int]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Starter]:
    """Start haproxy forwarding HOST:(new port) to 127.0.0.1:backend_port with SERVER_OPTIONS."""
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(host: str, backend_port: int, server_options: str) -> int:
        port = free_port(host)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = tmp_path / f"haproxy-{port}.cfg"
        config.write_text(
            "global\n    maxconn 100\n"
            "defaults\n    mode tcp\n    timeout connect 10s\n"
            "    timeout client 30s\n    timeout server 30s\n"
            f"frontend fe\n    bind {bind}\n    default_backend be\n"
            f"backend be\n    server s1 127.0.0.1:{backend_port} {server_options}\n"
        )
        log = tmp_path / f"haproxy-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        processes.append((process, log))
        return port

    yield start
    for process, log in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(log.read_text(errors="replace"))


class Capture:
    """A backend that records every connection's bytes up to EOF."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            async with asyncio.timeout(30):
                while chunk := await reader.read(65536):
                    data += chunk
        except (TimeoutError, ConnectionError):
            pass  # haproxy ends health checks with a reset: keep what arrived
        except asyncio.CancelledError:
            return  # a probe connection still open when the test ends
        await self.received.put(data)
        writer.close()

    async def next_with(self, tail: bytes) -> bytes:
        async with asyncio.timeout(30):
            while True:  # readiness probes and health checks arrive too: skip them
                data = await self.received.get()
                if data.endswith(tail):
                    return data


async def _wait_listening(host: str, port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return


async def _through_haproxy(
    haproxy: Starter, front: str, client: str, option: str
) -> tuple[bytes, int, int]:
    capture = Capture()
    server = await asyncio.start_server(capture.handle, "127.0.0.1", 0)
    async with server:
        backend_port = server.sockets[0].getsockname()[1]
        port = haproxy(front, backend_port, option)
        await _wait_listening(front, port)
        reader, writer = await asyncio.open_connection(front, port, local_addr=(client, 0))
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(PAYLOAD)
        await writer.drain()
        writer.write_eof()
        raw = await capture.next_with(PAYLOAD)
        await asyncio.wait_for(reader.read(), 30)
        writer.close()
    return raw, port, client_port


async def _read_with_stream_reader(raw: bytes) -> tuple[object, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_proxy_header(reader, 5.0), await reader.read()


@pytest.mark.parametrize(
    ("option", "version"), [("send-proxy", 1), ("send-proxy-v2", 2)], ids=["v1", "v2"]
)
@pytest.mark.parametrize(
    ("front", "client"), [("127.0.0.1", "127.0.0.6"), ("::1", "::1")], ids=["ipv4", "ipv6"]
)
def test_parser_recovers_client_from_real_haproxy_header(
    haproxy: Starter, option: str, version: int, front: str, client: str
) -> None:
    raw, port, client_port = asyncio.run(_through_haproxy(haproxy, front, client, option))
    header = parse_proxy_header(raw)
    assert isinstance(header, ProxyHeader), header
    assert (header.version, header.command) == (version, PROXY)
    assert (header.src_ip, header.src_port) == (client, client_port)
    assert (header.dst_ip, header.dst_port) == (front, port)
    assert raw[header.consumed :] == PAYLOAD
    streamed, rest = asyncio.run(_read_with_stream_reader(raw))
    assert streamed == header and rest == PAYLOAD


async def _health_check(haproxy: Starter, option: str) -> tuple[bytes, int]:
    capture = Capture()
    server = await asyncio.start_server(capture.handle, "127.0.0.1", 0)
    async with server:
        backend_port = server.sockets[0].getsockname()[1]
        haproxy("127.0.0.1", backend_port, f"{option} check inter 200ms check-send-proxy")
        return await asyncio.wait_for(capture.received.get(), 30), backend_port


def test_haproxy_v2_health_check_is_local_and_keeps_real_peer(
    haproxy: Starter, client: ClientIdentity
) -> None:
    raw, _ = asyncio.run(_health_check(haproxy, "send-proxy-v2"))
    header = parse_proxy_header(raw)
    assert header == ProxyHeader(2, len(raw), LOCAL, UNSPEC), raw
    assert apply_proxy(client, header) is client


def test_haproxy_v1_health_check_names_its_own_connection(haproxy: Starter) -> None:
    raw, backend_port = asyncio.run(_health_check(haproxy, "send-proxy"))
    header = parse_proxy_header(raw)
    assert isinstance(header, ProxyHeader) and header.consumed == len(raw), raw
    assert (header.version, header.command, header.src_ip) == (1, PROXY, "127.0.0.1")
    assert (header.dst_ip, header.dst_port) == ("127.0.0.1", backend_port)


# ---- implicit TLS behind haproxy send-proxy-v2 (the header comes before the handshake) ----


def swaks_tls_on_connect(port: int, source: str, user: str, password: str) -> str:
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--local-interface", source,
         "--tls-on-connect", "--auth", "PLAIN", "--auth-user", user, "--auth-password",
         password, "--from", f"{user}@example.org", "--to", "bob@example.net",
         "--helo", "mua.test", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_implicit_tls_daemon_behind_haproxy_send_proxy_v2(
    haproxy: Starter, tmp_path: Path, capture: Path
) -> None:
    from tests.ofmipd_server import captured_messages, start_daemon, wait_for_port
    from tests.tls_support import make_certificate

    users = tmp_path / "users"
    users.write_text("alice:Proxy-Tls-5\n")
    users.chmod(0o600)
    cert, key = make_certificate(tmp_path)
    with start_daemon(
        tmp_path, users, capture, "--ssl", "--ssl-cert", str(cert), "--ssl-key", str(key),
        "--proxy-protocol", "127.0.0.1",
    ) as daemon:  # fmt: skip
        front = haproxy("127.0.0.1", daemon.port, "send-proxy-v2")
        wait_for_port("127.0.0.1", front)
        transcript = swaks_tls_on_connect(front, "127.0.0.6", "alice", "Proxy-Tls-5")
        time.sleep(0.3)
        log = daemon.log_text()
    assert "<~  220 mx.test ESMTP ofmipd" in transcript, transcript  # ~: over TLS
    ((_, message),) = captured_messages(capture)
    received = message.split(b"\r\n\r\n", 1)[0].decode()
    assert "[127.0.0.6]" in received and "with ESMTPSA" in received, received
    (end,) = [x for x in log.splitlines() if "end client=127.0.0.6 " in x]
    assert "source=proxy-v2 tls=yes user=alice" in end and "messages=1" in end, end


def test_one_session_under_tcpserver_behind_haproxy_send_proxy_v2(
    haproxy: Starter, work: Any
) -> None:
    from tests.deploy_support import PASSWORD, USER, make_certificate, received, wait_for_banner

    cert, key, _ = make_certificate(work.root)
    port = free_port()
    tcpserver = work.start(
        [shutil.which("tcpserver") or "/usr/bin/tcpserver", "-R", "-H", "-l", "0",
         "127.0.0.1", str(port), str(work.ofmipd), "-1", "--hostname", "mx.test",
         "--ssl", "--ssl-cert", str(cert), "--ssl-key", str(key),
         "--proxy-protocol", "127.0.0.1", "-a", str(work.users),
         "--sendmail", str(work.sendmail)],
        "tcpserver",
    )  # fmt: skip
    wait_for_banner("127.0.0.1", port, tcpserver)
    front = haproxy("127.0.0.1", port, "send-proxy-v2")
    wait_for_banner("127.0.0.1", front)
    transcript = swaks_tls_on_connect(front, "127.0.0.7", USER, PASSWORD)
    assert "<~  220 mx.test ESMTP ofmipd" in transcript, transcript  # ~: over TLS
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.7]" in header and "with ESMTPSA" in header, header
    time.sleep(0.3)
    (end,) = [x for x in tcpserver.log().splitlines() if "end client=127.0.0.7 " in x]
    assert "source=proxy-v2 tls=yes" in end and "result=authenticated" in end, end
