"""The namespace LAN itself: hosts reach each other, faults cut them off, and nothing outlives a run."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.lan.netns import LOCK_DIR, PREFIX, Host, Lan, ip, namespaces, sweep_stale

pytestmark = pytest.mark.lan


@contextmanager
def http_server(lan: Lan, host: Host, port: int = 8000) -> Iterator[None]:
    proc = subprocess.Popen(lan.exec_argv(host, [sys.executable, "-m", "http.server", "--bind", host.addr,
                                                  str(port)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not reaches(lan, host, host, port):
            assert time.monotonic() < deadline, "the test server did not start"
            assert proc.poll() is None, "the test server exited"
        yield
    finally:
        proc.kill()
        proc.wait()


def reaches(lan: Lan, src: Host, dst: Host, port: int = 8000) -> bool:
    """An HTTP request from ``src`` to ``dst`` gets an answer within a second."""
    r = subprocess.run(lan.exec_argv(src, ["curl", "-s", "-o", "/dev/null", "--max-time", "1",
                                           f"http://{dst.addr}:{port}/"]), check=False, timeout=10)
    return r.returncode == 0


def reaches_again(lan: Lan, src: Host, dst: Host, within: float = 10.0) -> bool:
    """After a heal: ``src`` reaches ``dst`` within ``within`` seconds. A port that comes back up is not
    forwarding at the very instant `ip link set up` returns, and the neighbour entry that failed while the
    link was down is resolved again on the next try (a bare check once flaked in CI)."""
    deadline = time.monotonic() + within
    while not reaches(lan, src, dst):
        if time.monotonic() > deadline:
            return False
    return True


def test_hosts_reach_each_other_and_faults_cut_them_off() -> None:
    with Lan(3) as lan:
        h1, h2, h3 = lan.hosts
        with http_server(lan, h1):
            assert reaches(lan, h2, h1) and reaches(lan, lan.client, h1)
            lan.partition([[h2, h3], [h1]])
            assert not reaches(lan, h2, h1) and not reaches(lan, lan.client, h1)
            lan.heal_partition()
            assert reaches_again(lan, h2, h1)
            lan.link_down(h1)
            assert not reaches(lan, h3, h1)
            assert reaches(lan, h1, h1)  # a cut-off host still reaches itself
            lan.link_up(h1)
            assert reaches_again(lan, h3, h1)
            lan.set_slow(h1, 512, 100)
            assert reaches_again(lan, h3, h1)  # slow, not cut off
            lan.heal_all()
            assert not lan.netem and not lan.down and not lan.groups


def test_every_namespace_and_process_goes_even_when_the_test_fails() -> None:
    made: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), Lan(2) as lan:
        made = [lan.switch, *(h.ns for h in lan.all_hosts)]
        assert set(made) <= set(namespaces())
        proc = subprocess.Popen(lan.exec_argv(lan.hosts[0], ["sleep", "300"]))
        raise RuntimeError("boom")
    assert proc is not None
    assert proc.wait(timeout=5) != 0  # killed
    assert not set(made) & set(namespaces())
    assert not (LOCK_DIR / f"{made[0].split('-')[1]}.pid").exists()


def test_sweep_removes_what_a_crashed_run_left() -> None:
    run_id = secrets.token_hex(3)
    ns = f"{PREFIX}{run_id}-h1"
    dead = subprocess.Popen(["true"])
    dead.wait()
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    (LOCK_DIR / f"{run_id}.pid").write_text(str(dead.pid))  # its owner is gone
    live_id = secrets.token_hex(3)
    live = f"{PREFIX}{live_id}-h1"
    (LOCK_DIR / f"{live_id}.pid").write_text(str(os.getpid()))  # a run that is still going
    ip("netns", "add", ns)
    ip("netns", "add", live)
    try:
        removed = sweep_stale()
        assert ns in removed and ns not in namespaces()
        assert live in namespaces()
    finally:
        ip("netns", "del", ns, check=False)
        ip("netns", "del", live, check=False)
        (LOCK_DIR / f"{live_id}.pid").unlink(missing_ok=True)
        (LOCK_DIR / f"{run_id}.pid").unlink(missing_ok=True)
