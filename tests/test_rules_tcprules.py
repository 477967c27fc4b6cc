"""tcprules-syntax host rules decide as tcpserver does: checked against the real tcprules
and tcprulescheck (random files), and on a real daemon and a one-session process."""

from __future__ import annotations

import random
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ofmipd.rules import ALLOW, DENY, RELAY, Rules
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, ofmipd_command, server_env

# A small address universe, so that rules nest, overlap and repeat.
FIRST = (10, 127, 192)
SECOND = (0, 1, 168)
THIRD = (0, 1, 2)
FOURTH = (0, 1, 2, 5, 6, 7, 9, 11, 100, 254, 255)

INSTRUCTIONS = (
    "deny",
    "deny",
    "allow",
    "allow",
    'allow,RELAYCLIENT=""',
    'allow,RELAYCLIENT="@fix.me"',
    "allow,RELAYCLIENT=/x y/",  # tcprules takes any quote character
    'deny,RELAYCLIENT=""',  # tcpserver drops the client and sets nothing
    'deny,TCPLOCALHOST="movie.edu"',
)


def _octets(rng: random.Random) -> list[int]:
    return [rng.choice(FIRST), rng.choice(SECOND), rng.choice(THIRD), rng.choice(FOURTH)]


def _key(rng: random.Random) -> tuple[int, str]:
    """(specificity 0-4, key) of one tcprules address."""
    a, b, c, d = _octets(rng)
    kind = rng.choices(
        ["default", "p1", "p2", "p3", "exact", "range", "range", "midrange"],
        [1, 2, 2, 3, 5, 2, 1, 1],
    )[0]
    if kind == "default":
        return 0, ""
    if kind == "p1":
        return 1, f"{a}."
    if kind == "p2":
        return 2, f"{a}.{b}."
    if kind == "p3":
        return 3, f"{a}.{b}.{c}."
    if kind == "exact":
        return 4, f"{a}.{b}.{c}.{d}"
    if kind == "range":
        low = rng.choice([0, 1, 2, 5, 7, 250])
        high = low + rng.choice([0, 1, 3, 6, 60])  # 250+60 is cut at 255 by tcprules
        text = f"{low:02d}" if rng.random() < 0.15 else str(low)  # tcprules reads 07 as 7
        return 4, f"{a}.{b}.{c}.{text}-{high}"
    return 2, f"{a}.{b}-{b + rng.choice([0, 1, 2])}."


def random_rules(rng: random.Random) -> str:
    """A rules file tcprules compiles and ofmipd accepts, written to make order matter."""
    lines = [(*_key(rng), rng.choice(INSTRUCTIONS)) for _ in range(rng.randint(2, 12))]
    for _ in range(rng.choice([0, 0, 1, 2])):  # the same address again, other instructions
        specificity, key, _ = rng.choice(lines)
        lines.insert(rng.randrange(len(lines) + 1), (specificity, key, rng.choice(INSTRUCTIONS)))
    order = rng.random()
    if order < 0.4:  # the default and broad prefixes above specific lines: the reported bug
        lines.sort(key=lambda line: line[0])
    elif order < 0.6:
        lines.sort(key=lambda line: -line[0])
    text = []
    for _, key, instructions in lines:
        if rng.random() < 0.15:
            text.append(rng.choice(["# a comment", "#1.2.3.4:deny", "", "#:deny"]))
        text.append(f"{key}:{instructions}" + rng.choice(["", "", "", " ", "\t", " \t "]))
    return "\n".join(text) + rng.choice(["\n", ""])


def _expand(key: str) -> list[str]:
    """tcprules' range expansion, written independently of ofmipd's, for the file-order count."""
    if "-" not in key:
        return [key]
    head, _, tail = key.partition("-")
    prefix, _, low = head.rpartition(".")
    high, dot, rest = tail.partition(".")
    prefix = prefix + "." if prefix else ""
    return [f"{prefix}{n}{dot}{rest}" for n in range(int(low), min(int(high), 255) + 1)]


def file_order_decision(text: str, ip: str) -> str:
    """What the first matching line in file order says (what ofmipd did before)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, instructions = line.rstrip(" \t").partition(":")
        for one in _expand(key):
            if one == ip or one == "" or (one.endswith(".") and ip.startswith(one)):
                if instructions.startswith("deny"):
                    return DENY
                return RELAY if "RELAYCLIENT" in instructions else ALLOW
    return ALLOW


def addresses_near(rng: random.Random, text: str, count: int) -> list[str]:
    """Client addresses inside, beside and outside the file's keys."""
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")]
    out = []
    for _ in range(count):
        octets = _octets(rng)
        key = rng.choice(keys)
        given = [part for part in rng.choice(_expand(key)).split(".") if part]
        octets[: len(given)] = [int(part) for part in given]
        if rng.random() < 0.3:  # a neighbour of a rule's address
            octets[3] = max(0, min(255, octets[3] + rng.choice([-1, 1])))
        out.append(".".join(map(str, octets)))
    return out


def tcprulescheck_decisions(
    tmp_path: Path, files: list[str], addresses: list[list[str]]
) -> list[list[tuple[str, str]]]:
    """(decision, rule tcprulescheck names) per address: every file compiled by the real
    tcprules and every address checked by the real tcprulescheck, in one shell."""
    script = ["set -u"]
    for number, text in enumerate(files):
        rules = tmp_path / f"{number}.rules"
        rules.write_text(text)
        cdb, tmp = tmp_path / f"{number}.cdb", tmp_path / f"{number}.tmp"
        script.append(f"tcprules {cdb} {tmp} < {rules} || echo '@fail {number}'")
        for ip in addresses[number]:
            script.append(f"echo '@check'; TCPREMOTEIP={ip} tcprulescheck {cdb}")
    result = subprocess.run(
        ["sh"], input="\n".join(script), capture_output=True, text=True, timeout=600, check=True
    )
    assert "@fail" not in result.stdout and result.stderr == "", result.stderr
    checks = result.stdout.split("@check\n")[1:]
    answers = []
    for check in checks:
        lines = check.splitlines()
        if "deny connection" in lines:
            decision = DENY
        elif any(line.startswith("set environment variable RELAYCLIENT=") for line in lines):
            decision = RELAY
        else:
            assert lines[-1] == "allow connection", check
            decision = ALLOW
        answers.append((decision, lines[0]))  # "rule 10.1.:" or "default:"
    flat = iter(answers)
    return [[next(flat) for _ in ips] for ips in addresses]


@pytest.mark.slow
def test_random_tcprules_files_decide_as_tcprulescheck(tmp_path: Path) -> None:
    rng = random.Random(12_2024)
    files = [random_rules(rng) for _ in range(250)]
    addresses = [addresses_near(rng, text, 12) for text in files]
    expected = tcprulescheck_decisions(tmp_path, files, addresses)
    decisions: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    order_matters = mismatches = 0
    for number, text in enumerate(files):
        rules = Rules.from_text(text, f"{number}.rules")
        for ip, (decision, named) in zip(addresses[number], expected[number], strict=True):
            action = rules.match(ip).action
            if action != decision:
                mismatches += 1
                if mismatches <= 5:
                    print(f"MISMATCH {ip}: tcprulescheck {decision} ({named}), ofmipd {action}")
                    print(text)
            decisions[decision] += 1
            key = named.removeprefix("rule ").removesuffix(":")
            level = {"default": "no line", "": "the : line", ip: "exact"}.get(key, "prefix")
            levels[level] += 1
            order_matters += file_order_decision(text, ip) != decision
    checks = sum(decisions.values())
    print(
        f"\n{len(files)} tcprules files, {checks} addresses: "
        + ", ".join(f"{name} {count}" for name, count in sorted(decisions.items()))
        + "; decided by "
        + ", ".join(f"{name} {count}" for name, count in sorted(levels.items()))
        + f"; file order would differ for {order_matters}; mismatches {mismatches}"
    )
    assert mismatches == 0
    assert checks >= 200 and min(decisions.values()) > checks // 10
    assert order_matters > checks // 20  # the files really exercise the order


def test_daemon_denies_host_line_below_default_allow(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("gina:pw-gina-1\n")
    users.chmod(0o600)
    rules = tmp_path / "tcp.smtp"
    rules.write_text(':allow\n127.:allow,RELAYCLIENT=""\n127.0.0.11:deny\n127.0.0.12:allow\n')
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
            "--sendmail", CAPTURE, "--rules", str(rules)]  # fmt: skip
    with Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(tmp_path))) as daemon:
        assert _session(daemon.port, "127.0.0.11", b"") == [b"554 5.7.1 Access denied"]
        # the host line below the broad RELAYCLIENT line: must log in
        assert _session(daemon.port, "127.0.0.12", b"MAIL FROM:<a@b.test>")[-1].startswith(b"530")
        assert _session(daemon.port, "127.0.0.13", b"MAIL FROM:<a@b.test>")[-1].startswith(b"250")


def _session(port: int, source: str, command: bytes) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as s:
        reader = s.makefile("rb")
        replies = [reader.readline().rstrip(b"\r\n")]
        if replies[0].startswith(b"220") and command:
            s.sendall(b"EHLO t.test\r\n")
            while reader.readline()[3:4] == b"-":  # the EHLO reply
                pass
            s.sendall(command + b"\r\n")
            replies.append(reader.readline().rstrip(b"\r\n"))
        return replies


def test_one_session_denies_host_line_below_default_allow(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("gina:pw-gina-1\n")
    users.chmod(0o600)
    rules = tmp_path / "tcp.smtp"
    rules.write_text(":allow\n127.0.0.11:deny\n")
    command = ofmipd_command("-1", "--hostname", "mx.test", "-a", str(users),
                             "--sendmail", CAPTURE, "--rules", str(rules))  # fmt: skip
    denied = subprocess.run(
        command, input=b"QUIT\r\n", capture_output=True, timeout=60,
        env=server_env(TCPREMOTEIP="127.0.0.11"),
    )  # fmt: skip
    allowed = subprocess.run(
        command, input=b"QUIT\r\n", capture_output=True, timeout=60,
        env=server_env(TCPREMOTEIP="127.0.0.12"),
    )  # fmt: skip
    assert denied.stdout.startswith(b"554 5.7.1"), denied
    assert allowed.stdout.startswith(b"220 "), allowed


def test_check_config_says_the_shipped_tcprules_file_is_read_as_tcpserver(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("gina:pw-gina-1\n")
    users.chmod(0o600)
    shipped = Path(__file__).resolve().parent.parent / "conf" / "tcpserver" / "tcp.smtp"
    result = subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), "--sendmail", CAPTURE,
                       "--rules", str(shipped)),
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"rules: 3 from {shipped} (most specific address first, as tcpserver)" in result.stdout
