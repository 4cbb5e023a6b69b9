"""AWS Cloud Map API discovery: `DiscoverInstances` instead of DNS.

Cloud Map DNS answers carry at most 8 records; the API returns up to 1000
instances and their health, so large services use this strategy. boto3 is
optional (`pip install 'shoal[aws]'`): it is imported only when this strategy
is used. The call is blocking, so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from typing import Any

from shoal.config import ConfigError, Peer, Settings
from shoal.discovery.base import Propose, host_peers, poll_forever
from shoal.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# One API call must not outlast a few polling rounds; botocore's defaults
# (60 s connect/read timeouts, retries) would stall discovery for minutes.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
MAX_ATTEMPTS = 2  # in all, the first attempt included (botocore: total_max_attempts)
MAX_RESULTS = 1000  # the API's maximum


def make_client() -> Any:
    """A `servicediscovery` client with short timeouts; region from the usual AWS settings."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import NoRegionError
    except ImportError:
        raise ConfigError(
            "TOPOLOGY_TYPE=cloudmap needs boto3: install shoal with the `aws` extra "
            "(pip install 'shoal[aws]')."
        ) from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    try:
        # botocore reads only AWS_DEFAULT_REGION; ECS and the AWS docs use AWS_REGION.
        region = os.environ.get("AWS_REGION") or None
        return boto3.client("servicediscovery", region_name=region, config=config)
    except NoRegionError:
        raise ConfigError(
            "TOPOLOGY_TYPE=cloudmap needs an AWS region: set AWS_REGION or AWS_DEFAULT_REGION "
            "(ECS sets both for you)."
        ) from None


class CloudMapStrategy:
    """Propose `name_query@ip` for each instance of the Cloud Map service.

    `client` may be given (tests pass one wrapped in botocore's `Stubber`);
    otherwise one is made here, so a missing boto3 or region is reported at
    start-up rather than on the first round.
    """

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        self._client = client if client is not None else make_client()
        self._problems = RateLimitedLog(log)

    async def run(self, propose: Propose) -> None:
        await poll_forever(self.poll, self.settings.polling_interval, propose)

    async def poll(self) -> list[Peer]:
        """One round: the instances' addresses now, or `[]` when the call failed."""
        namespace, service = self.settings.cloudmap_namespace, self.settings.cloudmap_service
        try:
            response = await asyncio.to_thread(
                self._client.discover_instances,
                NamespaceName=namespace,
                ServiceName=service,
                HealthStatus="HEALTHY_OR_ELSE_ALL",
                MaxResults=MAX_RESULTS,
            )
        except Exception as exc:  # botocore raises many types; none may end discovery
            self._problems.problem(
                type(exc).__name__,
                "Cloud Map discovery: DiscoverInstances(%s/%s) failed: %s; proposing no peers",
                namespace,
                service,
                exc,
            )
            return []
        self._problems.recovered("Cloud Map discovery: %s/%s answers again", namespace, service)
        return self._peers(response)

    def _peers(self, response: Any) -> list[Peer]:
        ips: dict[str, None] = {}
        for instance in response.get("Instances") or []:
            attributes = instance.get("Attributes") or {}
            address = attributes.get("AWS_INSTANCE_IPV4") or attributes.get("AWS_INSTANCE_IPV6")
            try:
                if not isinstance(address, str):
                    raise ValueError(address)
                ip = str(ipaddress.ip_address(address))
            except ValueError:
                log.debug("Cloud Map discovery: instance %r has no IP attribute", instance)
                continue
            ips[ip] = None
        return host_peers(self.settings, ips)
