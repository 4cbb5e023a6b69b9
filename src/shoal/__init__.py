"""shoal: BEAM-style clustering for Python asyncio services."""

from shoal.config import ConfigError, Peer, Settings
from shoal.loop import run
from shoal.mesh import MembershipEvent, NodeDown
from shoal.messaging import CallTimeout, RemoteError, Subscription
from shoal.node import Node

__all__ = [
    "CallTimeout",
    "ConfigError",
    "MembershipEvent",
    "Node",
    "NodeDown",
    "Peer",
    "RemoteError",
    "Settings",
    "Subscription",
    "run",
]
