"""`shoal`: look up discovery DNS and talk to a running node through its control socket.

Every command except `lookup` and `cookie` asks a node running on this machine, as the
same user, over its unix control socket (see `shoal.control`). With one node
running nothing needs to be named; with several, pick one with `--node`.

Built on argparse, so the command costs the library no dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shoal import control
from shoal._version import version

DESCRIPTION = (
    "Inspect and operate shoal nodes. `lookup` asks DNS what discovery would see; "
    "the other commands ask a node running on this machine (as your user) through "
    "its control socket."
)


def echo(text: object = "") -> None:
    print(text)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error a newcomer can act on, and exit non-zero (no traceback)."""
    print(f"shoal: {message}", file=sys.stderr)
    sys.exit(code)


def find_socket(node: str | None, socket_path: Path | None) -> Path:
    """The socket to use: --socket, else --node's default path, else the only live node."""
    if socket_path is not None:
        return socket_path
    if node is not None:
        return control.socket_path_for(node)
    directory = control.socket_dir()
    live = list(control.live_sockets(directory))
    if len(live) == 1:
        return live[0]
    if not live:
        fail(
            f"no shoal node is running for this user (no control socket in {directory}).\n"
            "Start your app's node as this user (a node makes its socket when it starts), "
            "or pass --socket PATH if it uses SHOAL_CONTROL_SOCKET."
        )
    names = "\n".join(f"  {path.name.removesuffix('.sock')}" for path in live)
    fail(f"several nodes are running; choose one with --node NAME:\n{names}")


def ask(node: str | None, socket_path: Path | None, command: str, *args: str) -> Any:
    """Send one command to the node and return its result, or exit with its error."""
    path = find_socket(node, socket_path)
    try:
        with control.ControlClient(path) as client:
            reply = client.request(command, *args)
    except control.ControlError as exc:
        fail(not_reachable(node, path, exc))
    except (OSError, ValueError) as exc:
        fail(f"talking to {path} failed: {exc}")
    if reply.get("ok"):
        return reply.get("result")
    if reply.get("code") == "unknown-command":
        fail(
            f"the node does not support `{command}` (it may run an older shoal): "
            f"{reply.get('error')}"
        )
    fail(str(reply.get("error", "the node reported an error")))


def not_reachable(node: str | None, path: Path, exc: control.ControlError) -> str:
    if node is not None and exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return f"node {node} is not running on this machine for this user (no one at {path})."
    return str(exc.strerror)


def print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, default=str))


def cookie(args: argparse.Namespace) -> None:
    """Print a new strong RELEASE_COOKIE (256 random bits); give every node of a cluster the same.

    Example: `export RELEASE_COOKIE=$(shoal cookie)`.
    """
    from shoal import crypto

    echo(crypto.new_cookie())


def lookup(args: argparse.Namespace) -> None:
    """Print the A/AAAA addresses DNS returns for QUERY, one per line.

    Like libcluster's `DNSPoll.lookup_all_ips`: the hosts DNS discovery would
    try to connect to.
    """
    from shoal.discovery.dns import DNSLookupError, lookup_all_ips

    try:
        ips = asyncio.run(lookup_all_ips(args.query, args.dns_server))
    except DNSLookupError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--dns-server {args.dns_server!r} is not host:port ({exc})")
    if not ips:
        fail(f"{args.query} has no A or AAAA records")
    for ip in ips:
        echo(ip)


def status(args: argparse.Namespace) -> None:
    """Show a running node: its name, peers, readiness, topology, cookie fingerprint."""
    result = ask(args.node, args.socket, "status")
    if args.json:
        print_json(result)
        return
    singletons = result.pop("singletons", None) or {}
    job_rows = result.pop("jobs", None) or []
    for key, value in result.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        echo(f"{key + ':':<12} {value}")
    echo(f"{'singletons:':<12} {'-' if not singletons else ''}")
    for name, info in singletons.items():
        info = info if isinstance(info, dict) else {"holder": info}
        echo(f"  {name}: {info.get('holder') or 'nobody'} (mode {info.get('mode')})")
    echo(f"{'jobs:':<12} {'-' if not job_rows else ''}")
    _print_jobs(job_rows)


def _print_jobs(rows: list[Any]) -> None:
    """One line per job: what a person asks first (when, where, how it went)."""
    for job in rows:
        if not isinstance(job, dict):
            echo(f"  {job}")
            continue
        state = "running" if job.get("running") else (job.get("last_status") or "never run")
        echo(
            f"  {job.get('name')}  [{job.get('schedule')} {job.get('tz')}]"
            f"  {job.get('run_strategy')}  last {job.get('last_run') or '-'}"
            f" on {job.get('ran_on') or '-'} ({state})  next {job.get('next_run') or '-'}"
            + ("" if job.get("active", True) else "  (inactive)")
        )


def nodes(args: argparse.Namespace) -> None:
    """List the peers a running node is connected to (like Elixir's Node.list)."""
    result = ask(args.node, args.socket, "nodes")
    if args.json:
        print_json(result)
        return
    for name in result:
        echo(name)


def ping(args: argparse.Namespace) -> None:
    """Round-trip a message from the local node to a connected peer."""
    result = ask(args.node, args.socket, "ping", args.target)
    echo(f"pong from {result['node']} in {result['rtt_ms']:.2f} ms")


def connect(args: argparse.Namespace) -> None:
    """Make the local node connect to a peer (like Elixir's Node.connect)."""
    result = ask(args.node, args.socket, "connect", args.target)
    echo(f"connected to {result['node']}")


JOB_ACTIONS = ("add", "remove", "pause", "resume", "history")


def jobs(args: argparse.Namespace) -> None:
    """List the node's cron jobs, or change them on every node, or show a job's runs."""
    if args.action is not None:
        if args.action not in JOB_ACTIONS:
            fail(f"unknown jobs action {args.action!r}: use one of {', '.join(JOB_ACTIONS)}", 2)
        done = ask(args.node, args.socket, f"jobs-{args.action}", *args.args)
        if args.json or args.action != "history":
            print_json(done)
        else:
            _print_runs(done)
        return
    result = ask(args.node, args.socket, "jobs")
    if args.json or not isinstance(result, list):
        print_json(result)
        return
    if not result:
        echo("no jobs")
    _print_jobs(result)


def _print_runs(runs: list[Any]) -> None:
    """One line per run, newest first."""
    if not runs:
        echo("no runs")
    for run in runs:
        error = f"  {run.get('error')}" if run.get("error") else ""
        echo(
            f"  {run.get('tick')}  {run.get('status')}  attempts {run.get('attempts')}"
            f"  on {run.get('node')}  started {run.get('started_at')}"
            f"  {float(run.get('duration') or 0):.3f} s{error}"
        )


def run_job(args: argparse.Namespace) -> None:
    """Run a cron job now, once, on the node that holds it."""
    result = ask(args.node, args.socket, "run-job", args.name)
    echo(result if isinstance(result, str) else json.dumps(result, default=str))


def remote(args: argparse.Namespace) -> None:
    """Open an asyncio Python prompt inside the running node.

    Like an Elixir release's `remote`: `node` is the running shoal.Node and
    top-level `await` works. Ctrl-D leaves; the node keeps running.
    """
    path = find_socket(args.node, args.socket)
    try:
        client = control.ControlClient(path)
    except control.ControlError as exc:
        fail(not_reachable(args.node, path, exc))
    with client:
        client.sock.settimeout(None)  # typed code may legitimately run for long
        opened = client.request("remote")
        if not opened.get("ok"):
            fail(str(opened.get("error", "the node refused the console")))
        RemoteClient(client, opened["result"]["node"]).run()


class RemoteClient:
    """The terminal side of `shoal remote`: prompts, line editing, Ctrl-C, Ctrl-D."""

    def __init__(self, client: control.ControlClient, node_name: str) -> None:
        self.client = client
        self.ps1 = f"shoal({node_name})> "
        self.ps2 = "...".rjust(len(self.ps1) - 1) + " "

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.show(self.client.receive())  # the banner
        more = False
        while True:
            try:
                line = input(self.ps2 if more else self.ps1)
            except EOFError:
                if sys.stdin.isatty():
                    sys.stdout.write("\n")
                return
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                self.client.send({"interrupt": True})
                more = self.show(self.wait())
                continue
            self.client.send({"line": line})
            reply = self.wait()
            more = self.show(reply)
            if reply is None or reply.get("closed"):
                return

    def wait(self) -> dict[str, Any] | None:
        """The reply to what was sent; Ctrl-C meanwhile cancels the running code."""
        while True:
            try:
                return self.client.receive()
            except KeyboardInterrupt:
                self.client.send({"interrupt": True})
            except control.ControlError:
                return None

    @staticmethod
    def show(reply: dict[str, Any] | None) -> bool:
        if reply is None:
            return False
        sys.stdout.write(str(reply.get("output", "")))
        sys.stdout.flush()
        return bool(reply.get("more"))


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per function above, its docstring as its help."""
    top = argparse.ArgumentParser(prog="shoal", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"shoal {version()}")
    commands = top.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], None], *, local: bool = True
    ) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(run.__doc__ or "")
        sub = commands.add_parser(
            name,
            help=doc.split("\n")[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        if local:  # asks a node on this machine through its control socket
            sub.add_argument(
                "--node",
                "-n",
                metavar="NAME",
                help="Full name of the local node to ask, e.g. hi@10.0.0.2 "
                "(needed when several run).",
            )
            sub.add_argument(
                "--socket",
                "-s",
                metavar="PATH",
                type=Path,
                default=env_path("SHOAL_CONTROL_SOCKET"),
                help="Path of the node's control socket (default: SHOAL_CONTROL_SOCKET, "
                "else found).",
            )
        return sub

    command("cookie", cookie, local=False)
    sub = command("lookup", lookup, local=False)
    sub.add_argument("query", metavar="QUERY", help="DNS name, e.g. the Cloud Map service name.")
    sub.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        default=os.environ.get("SHOAL_DNS_SERVER") or None,
        help="Nameserver as host:port (default: SHOAL_DNS_SERVER, else the system resolver).",
    )
    json_help = "Print the raw JSON reply."
    command("status", status).add_argument("--json", action="store_true", help=json_help)
    command("nodes", nodes).add_argument("--json", action="store_true", help=json_help)
    command("ping", ping).add_argument(
        "target", metavar="NODE", help="Peer's full name, name@host."
    )
    command("connect", connect).add_argument(
        "target", metavar="NODE", help="name@host, host or host:port of the peer."
    )
    listing = command("jobs", jobs)
    listing.add_argument(
        "action",
        nargs="?",
        metavar="ACTION",
        help=f"one of {', '.join(JOB_ACTIONS)}; none lists the jobs. "
        "`jobs add NAME SCHEDULE TASK [KEY=VALUE ...]` (max_attempts=3 backoff=2 "
        "misfire=run_once ...), `jobs remove|pause|resume NAME`, `jobs history NAME [N]`",
    )
    listing.add_argument("args", nargs="*", metavar="ARG", help="the action's arguments")
    listing.add_argument("--json", action="store_true", help=json_help)
    command("run-job", run_job).add_argument(
        "name", metavar="NAME", help="Name of the job, as `shoal jobs` lists it."
    )
    command("remote", remote)
    return top


def env_path(variable: str) -> Path | None:
    """A path from the environment; unset and empty are the same (no path)."""
    value = os.environ.get(variable)
    return Path(value) if value else None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `.venv/bin/shoal`."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `shoal nodes | head` exits quietly
    top = parser()
    args = top.parse_args(argv)
    if not hasattr(args, "run"):  # `shoal` alone: what it can do
        top.print_help()
        sys.exit(2)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    main()
