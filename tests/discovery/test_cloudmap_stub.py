"""Cloud Map API discovery, against botocore's Stubber (a stub test: AWS is not reachable here).

These check the request we send and how responses and errors are handled;
they do not prove that the real Cloud Map answers this way.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from shoal.config import ConfigError, Peer, Settings
from shoal.discovery import strategy_for
from shoal.discovery.cloudmap import CloudMapStrategy, make_client
from tests.discovery.conftest import Rounds
from tests.support.procs import async_wait_until

EXPECTED_REQUEST = {
    "NamespaceName": "dbz.local",
    "ServiceName": "vegeta",
    "HealthStatus": "HEALTHY_OR_ELSE_ALL",
    "MaxResults": 1000,
}


def settings(**overrides: Any) -> Settings:
    return Settings(
        cookie="discovery-test-cookie-6b1f0e3a9c2d4e87",
        basename="vegeta",
        name_query="vegeta",
        host="10.0.2.106",
        topology="cloudmap",
        cloudmap_namespace="dbz.local",
        cloudmap_service="vegeta",
        polling_interval=0.05,
    ).with_overrides(**overrides)


def instance(instance_id: str, **attributes: str) -> dict[str, Any]:
    return {
        "InstanceId": instance_id,
        "NamespaceName": "dbz.local",
        "ServiceName": "vegeta",
        "HealthStatus": "HEALTHY",
        "Attributes": attributes,
    }


@pytest.fixture
def client() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client(
        "servicediscovery",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Stubber(client) as stubber:
        yield client, stubber


async def test_stub_proposes_instance_ipv4_except_our_own(client: tuple[Any, Stubber]) -> None:
    api, stubber = client
    stubber.add_response(
        "discover_instances",
        {
            "Instances": [
                instance("a", AWS_INSTANCE_IPV4="10.0.2.106", AWS_INSTANCE_PORT="4370"),
                instance("b", AWS_INSTANCE_IPV4="10.0.3.17", ECS_SERVICE_NAME="vegeta"),
                instance("c", AWS_INSTANCE_IPV4="10.0.1.5"),
                instance("d", AWS_INIT_HEALTH_STATUS="HEALTHY"),  # no address: skipped
            ],
            "InstancesRevision": 7,
        },
        EXPECTED_REQUEST,
    )
    peers = await CloudMapStrategy(settings(), client=api).poll()
    assert peers == [Peer("vegeta", "10.0.3.17", 4370), Peer("vegeta", "10.0.1.5", 4370)]
    stubber.assert_no_pending_responses()


async def test_stub_errors_propose_nothing_and_the_loop_goes_on(
    client: tuple[Any, Stubber], caplog: pytest.LogCaptureFixture
) -> None:
    api, stubber = client
    stubber.add_client_error(
        "discover_instances", "NamespaceNotFound", "Namespace not found", 400, EXPECTED_REQUEST
    )
    stubber.add_client_error(
        "discover_instances", "RequestLimitExceeded", "Slow down", 400, EXPECTED_REQUEST
    )
    stubber.add_response(
        "discover_instances",
        {"Instances": [instance("b", AWS_INSTANCE_IPV4="10.0.3.17")]},
        EXPECTED_REQUEST,
    )
    rounds = Rounds()
    task = asyncio.create_task(CloudMapStrategy(settings(), client=api).run(rounds))
    try:
        await async_wait_until(lambda: len(rounds.rounds) >= 3, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert rounds.rounds[:3] == [[], [], [Peer("vegeta", "10.0.3.17", 4370)]]
    assert "NamespaceNotFound" in caplog.text


async def test_stub_selected_by_topology_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    strategy = strategy_for(settings())
    assert isinstance(strategy, CloudMapStrategy)
    # It asks for the configured service, with the client it made itself.
    with Stubber(strategy._client) as stubber:
        stubber.add_response(
            "discover_instances",
            {"Instances": [instance("b", AWS_INSTANCE_IPV4="10.0.3.17")]},
            EXPECTED_REQUEST,
        )
        assert await strategy.poll() == [Peer("vegeta", "10.0.3.17", 4370)]


async def test_stub_proposes_ipv6_instances_and_skips_those_without_an_address(
    client: tuple[Any, Stubber],
) -> None:
    api, stubber = client
    stubber.add_response(
        "discover_instances",
        {
            "Instances": [
                instance("d", AWS_INIT_HEALTH_STATUS="HEALTHY"),  # no address: skipped
                instance("e", AWS_INSTANCE_IPV4="not-an-ip"),  # skipped
                instance("f", AWS_INSTANCE_IPV6="fd00::7"),
                instance("c", AWS_INSTANCE_IPV4="10.0.1.5"),
                instance("g", AWS_INSTANCE_IPV4="10.0.1.5"),  # the same address once
            ]
        },
        EXPECTED_REQUEST,
    )
    peers = await CloudMapStrategy(settings(), client=api).poll()
    assert peers == [Peer("vegeta", "fd00::7", 4370), Peer("vegeta", "10.0.1.5", 4370)]


def test_api_calls_are_bounded_by_short_timeouts_and_few_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore's defaults (60 s timeouts, retries) would stall discovery for minutes."""
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    config = make_client().meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.0, 5.0)
    assert config.retries == {"total_max_attempts": 2, "mode": "standard"}  # one retry


def test_missing_boto3_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError) as raised:
        CloudMapStrategy(settings())
    message = str(raised.value)
    assert message.startswith("TOPOLOGY_TYPE=cloudmap needs boto3: install shoal with the `aws`")
    assert message.endswith("(pip install 'shoal[aws]').")


def test_missing_region_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError) as raised:
        CloudMapStrategy(settings())
    message = str(raised.value)
    assert message.startswith("TOPOLOGY_TYPE=cloudmap needs an AWS region: set AWS_REGION or")
    assert message.endswith("(ECS sets both for you).")


@pytest.mark.parametrize("var", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_either_region_variable_is_enough(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """ECS and the AWS docs set AWS_REGION, which botocore alone does not read."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv(var, "eu-west-3")
    assert make_client().meta.region_name == "eu-west-3"
