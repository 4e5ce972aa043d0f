"""A real mosquitto 2.0 started with the files `netq credentials mosquitto` wrote, and the real mosquitto clients:
the farm's roles and rules hold on an external broker too."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shared import security
from shared.security import Role
from tests.mosquitto_fixture import require_tool
from tests.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.security, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
KEY_TEXT = security.new_farm_key()
KEY = security.parse_key(KEY_TEXT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture
async def mosquitto_with_credentials() -> AsyncIterator[int]:
    """mosquitto on 127.0.0.1 with the password file, ACL file and conf snippet of `netq credentials mosquitto`.

    A folder of its own under /tmp that others may enter: mosquitto started as root reads the files after it
    has become the user ``mosquitto`` (the command gives them to that user)."""
    exe = require_tool("mosquitto")
    folder = Path(tempfile.mkdtemp(prefix="netq-mosquitto-"))
    folder.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETQ_")}
    env.update(NETQ_FARM__KEY=KEY_TEXT, NETQ_DATA_DIR=str(folder / "data"), PYTHONPATH=str(REPO))
    made = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.app.cli", "credentials", "mosquitto", "--out", str(folder / "conf"), "--listen",
        f"127.0.0.1:{port}", env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(made.communicate(), 60)
    assert made.returncode == 0, out.decode()
    conf = folder / "conf" / "mosquitto.conf"
    assert "allow_anonymous false" in conf.read_text()
    (folder / "test.conf").write_text(conf.read_text() + "persistence false\n")
    with (folder / "mosquitto.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(exe, "-c", str(folder / "test.conf"), stdout=log,
                                                    stderr=subprocess.STDOUT)
    try:
        await until(lambda: reachable(port) or proc.returncode is not None, "mosquitto listening", 15,
                    context=lambda: (folder / "mosquitto.log").read_text())
        assert proc.returncode is None, (folder / "mosquitto.log").read_text()
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        shutil.rmtree(folder, ignore_errors=True)


def login(role: Role | None, secret: str | None = None) -> list[str]:
    if role is None:
        return []
    return ["-u", role.value, "-P", secret if secret is not None else security.broker_password(KEY, role)]


def pub(port: int, who: list[str], topic: str, message: str) -> int:
    """mosquitto_pub at QoS 1 (it waits for the PUBACK): its exit status."""
    return subprocess.run([require_tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), *who, "-q", "1",
                           "-t", topic, "-m", message], capture_output=True, timeout=15, check=False).returncode


async def first_message(port: int, who: list[str], topic_filter: str, send: Callable[[], None]) -> str:
    """Start mosquitto_sub (one message, verbose), then ``send()`` until it has one: what it got first.
    mosquitto_sub gives no sign that its SUBSCRIBE is acknowledged, so the sender repeats."""
    sub = await asyncio.create_subprocess_exec(
        require_tool("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), *who, "-t", topic_filter, "-v",
        "-C", "1", "-W", "15", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reading = asyncio.ensure_future(sub.communicate())
    for _ in range(40):
        await asyncio.to_thread(send)
        done, _ = await asyncio.wait({reading}, timeout=0.3)
        if done:
            break
    out, err = await reading
    assert sub.returncode == 0, err.decode()
    return out.decode().strip()


async def test_the_node_credentials_work_on_mosquitto(mosquitto_with_credentials: int) -> None:
    port = mosquitto_with_credentials
    got = await first_message(port, login(Role.NODE), "netq/_proto/#",
                              lambda: pub(port, login(Role.NODE), "netq/_proto/log", "entry"))
    assert got == "netq/_proto/log entry"


@pytest.mark.parametrize("who", [[], ["-u", "node", "-P", "wrong"], ["-u", "admin", "-P", "x"]])
async def test_anonymous_and_wrong_passwords_are_refused_by_mosquitto(mosquitto_with_credentials: int,
                                                                      who: list[str]) -> None:
    assert await asyncio.to_thread(pub, mosquitto_with_credentials, who, "netq/request/job/add", "{}") != 0


async def test_homeassistant_reads_the_farm_but_never_protocol_messages(mosquitto_with_credentials: int) -> None:
    port = mosquitto_with_credentials

    def send() -> None:  # a protocol message first, then a readable one, from one member, in that order
        assert pub(port, login(Role.NODE), "netq/_proto/log", "secret") == 0
        assert pub(port, login(Role.NODE), "netq/events", "readable") == 0

    assert await first_message(port, login(Role.HOMEASSISTANT), "#", send) == "netq/events readable"
    assert await first_message(port, login(Role.HOMEASSISTANT), "netq/#", send) == "netq/events readable"


async def test_homeassistant_cannot_write_protocol_topics_or_retire_a_node(mosquitto_with_credentials: int) -> None:
    port = mosquitto_with_credentials

    def send() -> None:  # refused ones first, then an allowed one
        for topic in ("netq/_proto/log", "netq/nodes/n1/state", "netq/request/node/retire"):
            pub(port, login(Role.HOMEASSISTANT), topic, "forged")
        assert pub(port, login(Role.HOMEASSISTANT), "netq/request/node/pause", "n1") == 0

    assert await first_message(port, login(Role.NODE), "#", send) == "netq/request/node/pause n1"
