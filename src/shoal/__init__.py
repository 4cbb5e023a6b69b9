"""shoal: BEAM-style clustering for Python asyncio services.

Everything an application needs is importable from here: `Node` (the one
object it holds), `Settings`, `run` (run a node until SIGTERM/SIGINT), the
contexts its singletons and jobs receive, the events and results it sees, and
every error it may catch.
"""

import logging

from shoal.config import ConfigError, Peer, Settings
from shoal.cron import CronError
from shoal.mesh import MembershipEvent, NodeDown
from shoal.messaging import (
    Busy,
    CallTimeout,
    RemoteError,
    ReplyTooLarge,
    Subscription,
    WaitTimeout,
)
from shoal.node import Node
from shoal.runner import run
from shoal.scheduler import (
    InvalidJob,
    Job,
    JobExists,
    JobNotFound,
    JobNotRun,
    JobRunning,
    JobState,
    RunContext,
    RunResult,
    SchedulerError,
)
from shoal.singleton import Service, SingletonContext
from shoal.wire import MessageTooLarge

# A library does not configure logging: without a handler of the app's, shoal's
# records go nowhere (not to stderr through logging's last resort).
logging.getLogger("shoal").addHandler(logging.NullHandler())

__all__ = [
    "Busy",
    "CallTimeout",
    "ConfigError",
    "CronError",
    "InvalidJob",
    "Job",
    "JobExists",
    "JobNotFound",
    "JobNotRun",
    "JobRunning",
    "JobState",
    "MembershipEvent",
    "MessageTooLarge",
    "Node",
    "NodeDown",
    "Peer",
    "RemoteError",
    "ReplyTooLarge",
    "RunContext",
    "RunResult",
    "SchedulerError",
    "Service",
    "Settings",
    "SingletonContext",
    "Subscription",
    "WaitTimeout",
    "run",
]


def __getattr__(name: str) -> str:
    """`shoal.__version__`, looked up on first use (importlib.metadata is not free)."""
    if name == "__version__":
        from shoal._version import version

        return version()
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
