"""NODE_HOST from the ECS task metadata endpoint v4, served by a local HTTP server.

The served documents are recorded Fargate responses (tests/support/*.json):
`${ECS_CONTAINER_METADATA_URI_V4}` returns the container document with
`Networks[].IPv4Addresses`; `.../task` nests it under `Containers[]`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shoal.config import ConfigError, Settings, ecs_task_ip

SUPPORT = Path(__file__).parent.parent / "support"
CONTAINER_ID = "cd189a933e5849daa93386466019ab50-2495160603"


class MetadataServer:
    def __init__(self) -> None:
        self.documents = {
            f"/v4/{CONTAINER_ID}": (SUPPORT / "ecs_task_metadata_v4.json").read_bytes(),
            f"/v4/{CONTAINER_ID}/task": (SUPPORT / "ecs_task_metadata_v4_task.json").read_bytes(),
            "/v4/no-network": b'{"DockerId": "x", "Networks": []}',
            "/v4/broken": b"{not json",
        }
        documents = self.documents

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = documents.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def uri(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v4/{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    server = MetadataServer()
    yield server
    server.close()


def test_container_document_gives_the_task_eni_address(metadata: MetadataServer) -> None:
    assert ecs_task_ip(metadata.uri(CONTAINER_ID)) == "10.0.2.106"


def test_task_document_is_understood_too(metadata: MetadataServer) -> None:
    assert ecs_task_ip(metadata.uri(f"{CONTAINER_ID}/task")) == "10.0.2.106"


def test_settings_from_env_uses_the_metadata_address(metadata: MetadataServer) -> None:
    env = {
        "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
        "ECS_CONTAINER_METADATA_URI_V4": metadata.uri(CONTAINER_ID),
    }
    settings = Settings.from_env(env)
    assert settings.host == "10.0.2.106"
    assert settings.name == "hi@10.0.2.106"


def test_node_host_overrides_the_metadata(metadata: MetadataServer) -> None:
    env = {
        "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
        "ECS_CONTAINER_METADATA_URI_V4": metadata.uri("broken"),
        "NODE_HOST": "127.0.0.2",
    }
    assert Settings.from_env(env).host == "127.0.0.2"


@pytest.mark.parametrize("path", ["broken", "no-network", "missing"])
def test_unusable_metadata_is_a_clear_error(metadata: MetadataServer, path: str) -> None:
    with pytest.raises(ConfigError, match="NODE_HOST"):
        ecs_task_ip(metadata.uri(path))


def test_unreachable_endpoint_is_a_clear_error(metadata: MetadataServer) -> None:
    uri = metadata.uri(CONTAINER_ID)
    metadata.close()
    env = {
        "RELEASE_COOKIE": "discovery-test-cookie-6b1f0e3a9c2d4e87",
        "ECS_CONTAINER_METADATA_URI_V4": uri,
    }
    with pytest.raises(ConfigError, match="could not be read"):
        Settings.from_env(env)
