"""`shoal` against real `hi` processes, through their control sockets.

Loopback aliases 127.0.11.x belong to this module.
"""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.dns_server import LocalDNSServer
from tests.support.hi import HiNode, hosts_list
from tests.support.procs import Procs, wait_until

SHOAL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "shoal")


def shoal(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "SHOAL_CONTROL_SOCKET"}
    return subprocess.run(
        [SHOAL, *args],
        env={**full_env, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def start(procs: Procs, host: str, socket: Path, peers: list[str]) -> HiNode:
    env = {
        "TOPOLOGY_TYPE": "static",
        "SHOAL_HOSTS": hosts_list(peers),
        "SHOAL_CONTROL_SOCKET": str(socket),
    }
    node = HiNode.start(procs, host, env=env)
    node.wait_ready()
    return node


@pytest.fixture
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short: a unix socket path is limited to ~107 bytes.
    return Path(tmp_path_factory.mktemp("ctl", numbered=True))


def test_status_nodes_ping_against_a_running_node(procs: Procs, sockets: Path) -> None:
    hosts = ["127.0.11.2", "127.0.11.3"]
    a, b = (start(procs, h, sockets / f"{h}.sock", hosts) for h in hosts)
    a.wait_nodes([b.name])
    socket = str(sockets / f"{a.host}.sock")

    status = shoal("status", "--socket", socket)
    assert status.returncode == 0, status.stderr
    assert a.name in status.stdout and "ready:" in status.stdout

    nodes = shoal("nodes", "--socket", socket)
    assert nodes.stdout.split() == [b.name]

    ping = shoal("ping", b.name, env={"SHOAL_CONTROL_SOCKET": socket})
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith(f"pong from {b.name} in ")

    unreachable = shoal("ping", "hi@127.0.11.99", "--socket", socket)
    assert unreachable.returncode == 1
    assert "not connected" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_connect_joins_two_nodes_that_did_not_know_each_other(procs: Procs, sockets: Path) -> None:
    a = start(procs, "127.0.11.4", sockets / "a.sock", ["127.0.11.4"])
    b = start(procs, "127.0.11.5", sockets / "b.sock", ["127.0.11.5"])
    assert a.nodes() == []

    result = shoal("connect", b.name, "--socket", str(sockets / "a.sock"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"connected to {b.name}"
    a.wait_nodes([b.name])
    b.wait_nodes([a.name])


def test_remote_console_through_a_pipe(procs: Procs, sockets: Path) -> None:
    hosts = ["127.0.11.6", "127.0.11.7"]
    a, b = (start(procs, h, sockets / f"{h}.sock", hosts) for h in hosts)
    a.wait_nodes([b.name])
    session = "\n".join(
        [
            "len(node.nodes())",
            f"rtt = await node.ping({b.name!r})",
            "print('rtt ok', 0 < rtt < 5)",
            "for name in node.nodes():",
            "    print('peer', name)",
            "",
            "1 / 0",
            "node.name",
        ]
    )
    result = shoal("remote", "--socket", str(sockets / f"{a.host}.sock"), stdin=session + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"asyncio console inside {a.name}" in out
    assert f"shoal({a.name})> 1\n" in out
    assert "rtt ok True" in out
    assert f"peer {b.name}" in out
    assert "ZeroDivisionError" in out
    assert f"'{a.name}'" in out
    assert a.proc.alive()  # leaving the console leaves the node running
    # Code typed in the console prints to the console, not to the node's log.
    assert "rtt ok" not in a.proc.output()


def test_remote_console_on_a_terminal(procs: Procs, sockets: Path) -> None:
    a = start(procs, "127.0.11.8", sockets / "a.sock", ["127.0.11.8"])
    pid, fd = pty.fork()
    if pid == 0:  # the child: shoal remote on a terminal
        os.execv(SHOAL, [SHOAL, "remote", "--socket", str(sockets / "a.sock")])
    exit_code: int | None = None
    try:
        prompt = f"shoal({a.name})> ".encode()
        read_until(fd, prompt)
        # Type only at a fresh prompt, as a person would: input sent while the
        # previous line is still being answered can reach the terminal before
        # readline has switched it to its own mode.
        os.write(fd, b"await asyncio.sleep(0, 'slept')\n")
        assert b"'slept'" in read_until(fd, prompt)
        os.write(fd, b"if True:\n")
        read_until(fd, b"... ")
        os.write(fd, b"    node.name\n")
        read_until(fd, b"... ")
        os.write(fd, b"\n")
        assert f"'{a.name}'".encode() in read_until(fd, prompt)
        os.write(fd, b"\x04")  # Ctrl-D
        deadline = time.monotonic() + 10
        while exit_code is None and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exit_code = os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        assert exit_code == 0, "shoal remote did not exit cleanly on Ctrl-D"
    finally:
        if exit_code is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def read_until(fd: int, marker: bytes, timeout: float = 10) -> bytes:
    """What the terminal shows up to and including `marker` (fails after `timeout`)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not seen.endswith(marker):
        if time.monotonic() > deadline:
            pytest.fail(f"{marker!r} not shown within {timeout} s; got {seen!r}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            seen += os.read(fd, 1)
    return seen


def test_errors_when_no_node_is_running(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    for args in (["status"], ["nodes"], ["remote"], ["ping", "hi@127.0.11.9"]):
        result = shoal(*args, env=env)
        assert result.returncode == 1, args
        assert "no shoal node is running" in result.stderr
        assert "Traceback" not in result.stderr
        assert ".venv/bin/hi" not in result.stderr  # the wheel has no `hi`: it is an example
    named = shoal("status", "--node", "hi@127.0.11.9", env=env)
    assert named.returncode == 1
    assert "node hi@127.0.11.9 is not running on this machine" in named.stderr


def test_several_nodes_need_a_name_and_sockets_are_private(
    procs: Procs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    runtime = Path(tmp_path_factory.mktemp("xdg"))
    env = {"TOPOLOGY_TYPE": "static", "XDG_RUNTIME_DIR": str(runtime), "SHOAL_CONTROL_SOCKET": ""}
    a, b = (HiNode.start(procs, h, env=env) for h in ("127.0.11.10", "127.0.11.11"))
    a.wait_ready()
    b.wait_ready()
    directory = runtime / "shoal"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for node in (a, b):
        assert stat.S_IMODE((directory / f"{node.name}.sock").stat().st_mode) == 0o600

    ambiguous = shoal("status", env={"XDG_RUNTIME_DIR": str(runtime)})
    assert ambiguous.returncode == 1
    assert "several nodes are running" in ambiguous.stderr
    assert a.name in ambiguous.stderr and b.name in ambiguous.stderr

    chosen = shoal("status", "--json", "--node", b.name, env={"XDG_RUNTIME_DIR": str(runtime)})
    assert chosen.returncode == 0, chosen.stderr
    assert f'"node": "{b.name}"' in chosen.stdout


def test_jobs_lists_the_hi_job_and_run_job_runs_it_on_the_leader(
    procs: Procs, sockets: Path
) -> None:
    hosts = ["127.0.11.12", "127.0.11.13"]
    a, b = (start(procs, h, sockets / f"{h}.sock", hosts) for h in hosts)
    a.wait_nodes([b.name])
    socket = str(sockets / f"{a.host}.sock")

    jobs = shoal("jobs", "--json", "--socket", socket)
    assert jobs.returncode == 0, jobs.stderr
    assert '"name": "hi"' in jobs.stdout and '"schedule": "*/5 * * * * *"' in jobs.stdout

    ran = shoal("run-job", "hi", "--socket", socket)
    assert ran.returncode == 0, ran.stderr
    leader = a.cluster()["singletons"]["shoal.scheduler"]
    assert leader in ran.stdout
    runner = a if leader == a.name else b
    assert f"Job running on: {leader}" in runner.proc.output()

    missing = shoal("run-job", "nope", "--socket", socket)
    assert missing.returncode == 1
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_lookup_prints_the_addresses_dns_returns() -> None:
    with LocalDNSServer() as dns:
        dns.set_records("hi.service.local", ["127.0.11.21", "127.0.11.20", "::1"])
        result = shoal("lookup", "hi.service.local", "--dns-server", dns.address_text)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["127.0.11.20", "127.0.11.21", "::1"]
        # The nameserver may come from the environment instead, as for the nodes.
        from_env = shoal("lookup", "hi.service.local", env={"SHOAL_DNS_SERVER": dns.address_text})
        assert from_env.returncode == 0, from_env.stderr
        assert from_env.stdout.split() == ["127.0.11.20", "127.0.11.21", "::1"]


def test_lookup_of_a_missing_name_is_a_clear_error() -> None:
    with LocalDNSServer() as dns:
        dns.set_mode("nxdomain")
        missing = shoal("lookup", "hi.service.local", "--dns-server", dns.address_text)
        assert missing.returncode == 1
        assert "NXDOMAIN" in missing.stderr
        assert "Traceback" not in missing.stderr


def test_usage_errors_exit_2_with_the_usage_and_no_traceback() -> None:
    for args in ([], ["status", "--bogus"], ["ping"], ["frobnicate"]):
        result = shoal(*args)
        assert result.returncode == 2, args
        assert "usage: shoal" in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    helped = shoal("status", "--help")
    assert helped.returncode == 0
    for flag in ("--node", "-n", "--socket", "-s", "--json"):
        assert flag in helped.stdout


def test_jobs_added_paused_and_removed_on_one_node_change_every_node(
    procs: Procs, sockets: Path
) -> None:
    hosts = ["127.0.11.40", "127.0.11.41"]
    a, b = (start(procs, h, sockets / f"{h}.sock", hosts) for h in hosts)
    a.wait_nodes([b.name])
    on_a, on_b = (["--socket", str(sockets / f"{n.host}.sock")] for n in (a, b))

    def job_on_b(name: str) -> dict[str, object] | None:
        listed = shoal("jobs", "--json", *on_b)
        assert listed.returncode == 0, listed.stderr
        return next((j for j in json.loads(listed.stdout) if j["name"] == name), None)

    added = shoal(
        "jobs", "add", "extra", "* * * * * *", "hi", "max_attempts=2", "backoff=0.5", *on_a
    )
    assert added.returncode == 0, added.stderr
    wait_until(lambda: job_on_b("extra") is not None, 5.0, message="b has the job")
    row = job_on_b("extra")
    assert row is not None and row["max_attempts"] == 2 and row["defined"] == "runtime"

    def runs_of_extra() -> list[str]:
        history = shoal("jobs", "history", "extra", *on_b)
        assert history.returncode == 0, history.stderr
        return [line for line in history.stdout.splitlines() if " ok " in line]

    wait_until(lambda: len(runs_of_extra()) >= 2, 10.0, message="runs in the history")
    assert "attempts 1" in runs_of_extra()[0]

    assert shoal("jobs", "pause", "extra", *on_b).returncode == 0
    wait_until(lambda: (job_on_b("extra") or {}).get("active") is False, 5.0)
    assert shoal("jobs", "remove", "extra", *on_b).returncode == 0
    wait_until(lambda: job_on_b("extra") is None, 5.0, message="removed everywhere")

    for args, code, words in [
        (["jobs", "add", "x", "* * * * * *", "nope"], 1, "no task named 'nope'"),
        (["jobs", "add", "x", "* * * * * *", "hi", "color=red"], 1, "KEY=VALUE"),
        (["jobs", "remove", "hi"], 1, "defined in code"),
        (["jobs", "history", "nope"], 1, "no job named 'nope'"),
        (["jobs", "launch", "x"], 2, "unknown jobs action"),
    ]:
        failed = shoal(*args, *on_a)
        assert failed.returncode == code and words in failed.stderr, (args, failed.stderr)
        assert "Traceback" not in failed.stderr
