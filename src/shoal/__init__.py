"""shoal: BEAM-style clustering for Python asyncio services.

Everything an application needs is importable from here: `Node` (the one
object it holds), `Settings`, `run` (run a node until SIGTERM/SIGINT), the
contexts its singletons and jobs receive, the events and results it sees, and
every error it may catch.
"""

import logging
from typing import TYPE_CHECKING, Any

from shoal.config import ConfigError, Peer, Settings
from shoal.mesh import MembershipEvent, NodeDown
from shoal.messaging import (
    Busy,
    CallTimeout,
    RemoteError,
    ReplyTooLarge,
    Subscription,
    SubscriptionClosed,
    WaitTimeout,
)
from shoal.node import Node
from shoal.runner import run
from shoal.singleton import Service, SingletonContext
from shoal.wire import MessageTooLarge

if TYPE_CHECKING:
    from shoal.cron import CronError
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

# The jobs' names, imported on first use, as the node imports the jobs modules
# (shoal.jobs) only when it starts or its jobs are first used.
_JOB_NAMES = {
    "CronError": "shoal.cron",
    "InvalidJob": "shoal.scheduler",
    "Job": "shoal.scheduler",
    "JobExists": "shoal.scheduler",
    "JobNotFound": "shoal.scheduler",
    "JobNotRun": "shoal.scheduler",
    "JobRunning": "shoal.scheduler",
    "JobState": "shoal.scheduler",
    "RunContext": "shoal.scheduler",
    "RunResult": "shoal.scheduler",
    "SchedulerError": "shoal.scheduler",
}

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
    "SubscriptionClosed",
    "WaitTimeout",
    "run",
]


def __getattr__(name: str) -> Any:
    """The jobs' names and `shoal.__version__` (importlib.metadata is not free), on first use."""
    if name in _JOB_NAMES:
        import importlib

        value = getattr(importlib.import_module(_JOB_NAMES[name]), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from shoal._version import version

        return version()
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Every public name, the jobs' ones included before their first use."""
    return sorted({*globals(), *__all__})
