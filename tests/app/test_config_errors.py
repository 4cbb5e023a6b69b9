"""Every bad setting stops `hi` at start: exit code 2, one line naming the variable.

Each case runs the real `.venv/bin/hi` (several at once, so the whole list
takes a few seconds); the same cases go through `Settings.from_env` directly
as well, which is quick and shows the message when one changes.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from shoal.config import ConfigError, Settings
from tests.support.hi import COOKIE, HI

# (variable named in the message, extra environment)
CASES: list[tuple[str, dict[str, str]]] = [
    ("SHOAL_HOSTS", {"SHOAL_HOSTS": "hi@[::1]:99999"}),
    ("SHOAL_HOSTS", {"SHOAL_HOSTS": "[::1]:0"}),
    ("SHOAL_HOSTS", {"SHOAL_HOSTS": "[::1]:-5"}),
    ("SHOAL_HOSTS", {"SHOAL_HOSTS": "hi@10.0.0.1:0"}),
    ("NODE_NAME", {"NODE_NAME": "a@b"}),
    ("SHOAL_GOSSIP_ADDR", {"SHOAL_GOSSIP_ADDR": "garbage"}),
    ("SHOAL_GOSSIP_ADDR", {"SHOAL_GOSSIP_ADDR": "10.0.0.1"}),
    ("SHOAL_GOSSIP_TTL", {"SHOAL_GOSSIP_TTL": "999"}),
    ("SHOAL_GOSSIP_TTL", {"SHOAL_GOSSIP_TTL": "-1"}),
    ("SHOAL_DNS_SERVER", {"SHOAL_DNS_SERVER": "::::"}),
    ("SHOAL_LEASE_DSN", {"SHOAL_LEASE_DSN": "garbage"}),
    ("SHOAL_LEASE_DSN", {"SHOAL_SINGLETON_MODE": "lease", "SHOAL_LEASE_DSN": "garbage"}),
    ("POLLING_INTERVAL", {"POLLING_INTERVAL": "99999999999999999"}),
    ("POLLING_INTERVAL", {"POLLING_INTERVAL": "5"}),  # meant as seconds: 5 ms
    ("SHOAL_BUSY_POLL_US", {"SHOAL_BUSY_POLL_US": "-1"}),
    ("SHOAL_BUSY_POLL_US", {"SHOAL_BUSY_POLL_US": "50000"}),  # polls 50 ms after each read
    ("NODE_HOST", {"NODE_HOST": "0.0.0.0"}),
    ("NODE_HOST", {"NODE_HOST": "::"}),
    ("NODE_HOST", {"NODE_HOST": "255.255.255.255"}),
    ("NODE_HOST", {"NODE_HOST": "224.0.0.1"}),
    ("RELEASE_COOKIE", {"RELEASE_COOKIE": "a"}),
    ("RELEASE_COOKIE", {"RELEASE_COOKIE": " " * 40}),
    ("RELEASE_COOKIE", {"RELEASE_COOKIE": "ab" * 20}),
    ("SHOAL_ALLOW_WEAK_COOKIE", {"SHOAL_ALLOW_WEAK_COOKIE": "maybe"}),
]
BASE = {"RELEASE_COOKIE": COOKIE, "NODE_HOST": "127.0.10.90", "TOPOLOGY_TYPE": "static"}
NOT_UTF8 = b"\xff\xfe" + b"0123456789abcdef" * 3


def run_hi(env: dict[bytes, bytes]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([HI], env=env, capture_output=True, timeout=60, check=False)


def environment(extra: dict[str, str]) -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "NODE_"))}
    return {os.fsencode(k): os.fsencode(v) for k, v in {**env, **BASE, **extra}.items()}


@pytest.mark.parametrize(("variable", "extra"), CASES)
def test_settings_refuse_with_a_message_naming_the_variable(
    variable: str, extra: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, **extra})
    assert variable in str(info.value)
    assert "\n" not in str(info.value)


def test_hi_exits_2_with_one_line_naming_the_variable_for_every_case() -> None:
    envs = [environment(extra) for _, extra in CASES]
    # Not valid UTF-8: os.environ holds it with surrogate escapes.
    envs.append({**environment({}), b"RELEASE_COOKIE": NOT_UTF8})
    variables = [variable for variable, _ in CASES] + ["RELEASE_COOKIE"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run_hi, envs))
    for variable, env, result in zip(variables, envs, results, strict=True):
        stderr = result.stderr.decode(errors="replace").strip()
        shown = {k: v for k, v in env.items() if k not in environment({})}
        assert result.returncode == 2, (shown, stderr)
        assert variable in stderr and "Traceback" not in stderr, (shown, stderr)
        assert len(stderr.splitlines()) == 1, (shown, stderr)


def test_the_weak_cookie_opt_out_is_explicit() -> None:
    weak = {**BASE, "RELEASE_COOKIE": "short"}
    with pytest.raises(ConfigError, match="shoal cookie"):
        Settings.from_env(weak)
    assert Settings.from_env({**weak, "SHOAL_ALLOW_WEAK_COOKIE": "1"}).cookie == "short"
