"""Cloud Map API discovery through a custom endpoint, as with a local emulator.

A small HTTP server on loopback answers `DiscoverInstances` in the API's JSON
protocol, standing in for an emulator; the client is made from the environment
alone, as a node makes it. botocore sends `DiscoverInstances` to the host
`data-<endpoint host>` (the operation's host prefix), which no local endpoint
answers, unless `AWS_DISABLE_HOST_PREFIX_INJECTION=true` (see the README).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.config import Peer, Settings
from shoal.discovery.cloudmap import CloudMapStrategy


class Emulator(http.server.ThreadingHTTPServer):
    requests: list[tuple[str, str, dict[str, object]]]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Emulator

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 65536)
        body = json.loads(self.rfile.read(length) or b"{}")
        target = self.headers.get("X-Amz-Target", "")
        self.server.requests.append((self.headers.get("Host", ""), target, body))
        instances = [
            {
                "InstanceId": f"task-{ip}",
                "NamespaceName": body.get("NamespaceName"),
                "ServiceName": body.get("ServiceName"),
                "HealthStatus": "HEALTHY",
                "Attributes": {"AWS_INSTANCE_IPV4": ip},
            }
            for ip in ("127.0.0.7", "127.0.0.8")
        ]
        reply = json.dumps({"Instances": instances}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Emulator]:
    server = Emulator(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # The client's whole configuration comes from the environment, nothing from ~/.aws.
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DISABLE_HOST_PREFIX_INJECTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL_SERVICEDISCOVERY", f"http://localhost:{server.server_address[1]}"
    )
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def settings() -> Settings:
    return Settings(
        cookie="discovery-test-cookie-6b1f0e3a9c2d4e87",
        basename="vegeta",
        name_query="vegeta",
        host="127.0.0.6",
        topology="cloudmap",
        cloudmap_namespace="dbz.local",
        cloudmap_service="vegeta",
        polling_interval=0.05,
    )


async def test_a_custom_endpoint_works_without_the_host_prefix(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DISABLE_HOST_PREFIX_INJECTION", "true")
    peers = await CloudMapStrategy(settings()).poll()
    assert peers == [Peer("vegeta", "127.0.0.7", 4370), Peer("vegeta", "127.0.0.8", 4370)]
    ((host, target, body),) = emulator.requests
    assert host.startswith("localhost:")
    assert target.endswith(".DiscoverInstances")
    assert (body["NamespaceName"], body["ServiceName"]) == ("dbz.local", "vegeta")


async def test_with_the_host_prefix_the_emulator_is_never_reached(emulator: Emulator) -> None:
    # botocore asks `data-localhost`: the round fails (logged), proposes nothing.
    assert await CloudMapStrategy(settings()).poll() == []
    assert emulator.requests == []
