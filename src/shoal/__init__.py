"""shoal: BEAM-style clustering for Python asyncio services."""

from shoal.config import ConfigError, Peer, Settings
from shoal.loop import run
from shoal.mesh import MembershipEvent, NodeDown
from shoal.messaging import Busy, CallTimeout, RemoteError, ReplyTooLarge, Subscription
from shoal.node import Node
from shoal.wire import MessageTooLarge

__all__ = [
    "Busy",
    "CallTimeout",
    "ConfigError",
    "MembershipEvent",
    "MessageTooLarge",
    "Node",
    "NodeDown",
    "Peer",
    "RemoteError",
    "ReplyTooLarge",
    "Settings",
    "Subscription",
    "run",
]
