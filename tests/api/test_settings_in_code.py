"""Settings built in code: the defaults and the validation of `Settings.from_env`."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

import shoal
from shoal import ConfigError, Peer, Settings
from shoal.config import detect_host, parse_hosts

COOKIE = "test-cookie-api-a7b6c5d4e3f21098aa55"


def test_name_query_follows_the_basename_as_from_env() -> None:
    built = Settings(cookie=COOKIE, basename="app", host="127.0.0.1")
    env = Settings.from_env(
        {"RELEASE_COOKIE": COOKIE, "NODE_NAME": "app", "NODE_HOST": "127.0.0.1"}
    )
    assert built.name_query == env.name_query == "app"
    assert Settings(cookie=COOKIE, basename="app", name_query="other").name_query == "other"
    # A copy keeps what was built: an explicit query stays, a derived one was made explicit.
    assert built.with_overrides(port=4371).name_query == "app"


def test_the_host_is_detected_as_from_env_detects_it() -> None:
    env = Settings.from_env({"RELEASE_COOKIE": COOKIE})
    assert Settings(cookie=COOKIE).host == env.host == detect_host({})


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hosts": "app@10.0.0.2"}, r"Settings\(hosts=\.\.\.\) \(the setting of SHOAL_HOSTS\)"),
        ({"hosts": ["app@10.0.0.2"]}, r"hosts=.*must be a tuple of Peer.*parse_hosts"),
        ({"port": "4370"}, r"Settings\(port=\.\.\.\) \(the setting of SHOAL_PORT\) must be int"),
        ({"port": True}, r"Settings\(port=\.\.\.\)"),
        ({"polling_interval": "1"}, r"Settings\(polling_interval=\.\.\.\).*must be float, not str"),
        ({"dns_server": "10.0.0.2:53"}, r"Settings\(dns_server=\.\.\.\)"),
        ({"expected_nodes": 3.0}, r"Settings\(expected_nodes=\.\.\.\) must be int or None"),
        ({"mesh_encryption": 1}, r"Settings\(mesh_encryption=\.\.\.\) must be bool"),
        ({"basename": "a@b"}, r"NODE_NAME='a@b'"),
        ({"port": 70000}, r"SHOAL_PORT=70000"),
        # Durations as from_env allows them: a NaN passes every comparison, 0 spins.
        ({"handshake_timeout": -1}, r"handshake_timeout=-1.*SHOAL_HANDSHAKE_TIMEOUT_MS"),
        ({"polling_interval": 0}, r"polling_interval=0.*POLLING_INTERVAL.*positive"),
        ({"heartbeat_interval": float("nan")}, r"heartbeat_interval=nan"),
        ({"failure_timeout": float("inf")}, r"failure_timeout=inf"),
        ({"drain_timeout": 1e9}, r"drain_timeout=1000000000.0.*at most 86400"),
        ({"gossip_interval": 0.0}, r"gossip_interval=0.0"),
        ({"lease_ttl": -5.0}, r"lease_ttl=-5.0.*SHOAL_LEASE_TTL_MS"),
        ({"connect_timeout": float("nan")}, r"connect_timeout=nan"),
        ({"busy_poll": float("nan")}, r"SHOAL_BUSY_POLL_US=nan \(Settings\(busy_poll=nan\)"),
        ({"busy_poll": 1.0}, r"busy_poll=1.0.*expected 0 \(off\) to 10000 µs"),
        # Polled in vain, every round, while the node ran alone and said only so in its log.
        ({"discovery_endpoint": "http://hi.local"}, r"SERVICE_DISCOVERY_ENDPOINT='http://hi"),
        ({"discovery_endpoint": ""}, r"SERVICE_DISCOVERY_ENDPOINT is empty"),
        # Gossip's sockets are IPv4: with an IPv6 group it never joined, the node never ready.
        ({"gossip_addr": "ff15::1"}, r"SHOAL_GOSSIP_ADDR=ff15::1: expected an IPv4 multicast"),
    ],
)
def test_a_wrong_value_is_refused_at_construction_naming_the_field(
    changes: dict[str, Any], named: str
) -> None:
    values: dict[str, Any] = {"cookie": COOKIE, "host": "127.0.0.1", **changes}
    with pytest.raises(ConfigError, match=named):
        Settings(**values)


def test_a_wrong_cookie_type_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(cookie=b"secret-bytes-secret-bytes-secret-bytes", host="127.0.0.1")  # type: ignore[arg-type]
    assert "secret-bytes" not in str(raised.value) and str(raised.value) == (
        "Settings(cookie=...) (the setting of RELEASE_COOKIE) must be str, not bytes "
        "(its value is not shown: a secret)."
    )


def test_static_hosts_built_in_code() -> None:
    hosts = parse_hosts("app@10.0.0.2,10.0.0.3:4371", "app", 4370)
    settings = Settings(
        cookie=COOKIE, basename="app", host="10.0.0.2", topology="static", hosts=hosts
    )
    assert settings.hosts == (Peer("app", "10.0.0.2", 4370), Peer("app", "10.0.0.3", 4371))


def test_the_library_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("shoal").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_every_public_name_is_exported_and_documented() -> None:
    readme = (__import__("pathlib").Path(__file__).parents[2] / "README.md").read_text()
    for name in shoal.__all__:
        assert getattr(shoal, name) is not None
        assert f"`{name}" in readme or f"shoal.{name}" in readme, f"{name} is not in the README"


def test_import_shoal_stays_light() -> None:
    """`import shoal` loads neither the optional extras nor what only a running node needs."""
    code = (
        "import sys, shoal; print(' '.join(m for m in ("
        "'urllib.request', 'http.client', 'cryptography', 'shoal.control', 'code', 'dns',"
        "'uvicorn', 'fastapi', 'boto3', 'asyncpg', 'prometheus_client', 'typer', 'uvloop'"
        ") if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


def test_the_dns_endpoint_from_the_environment_must_be_a_host_name() -> None:
    env = {"RELEASE_COOKIE": COOKIE, "NODE_HOST": "127.0.0.1"}
    with pytest.raises(ConfigError, match=r"SERVICE_DISCOVERY_ENDPOINT='hi local' is neither"):
        Settings.from_env({**env, "SERVICE_DISCOVERY_ENDPOINT": "hi local"})
    assert Settings.from_env(env).discovery_endpoint == "ecs.local"
    # Only DNS polling reads it.
    gossip = {**env, "TOPOLOGY_TYPE": "gossip", "SERVICE_DISCOVERY_ENDPOINT": "hi local"}
    assert Settings.from_env(gossip).topology == "gossip"
