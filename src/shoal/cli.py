"""`shoal`: look up discovery DNS and talk to a running node through its control socket.

Every command except `lookup` and `cookie` asks a node running on this machine, as the
same user, over its unix control socket (see `shoal.control`). With one node
running nothing needs to be named; with several, pick one with `--node`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from shoal import control

app = typer.Typer(
    name="shoal",
    help=(
        "Inspect and operate shoal nodes. `lookup` asks DNS what discovery would see; "
        "the other commands ask a node running on this machine (as your user) through "
        "its control socket."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NodeOption = Annotated[
    str | None,
    typer.Option(
        "--node",
        "-n",
        help="Full name of the local node to ask, e.g. hi@10.0.0.2 (needed when several run).",
        show_default=False,
    ),
]
SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        "-s",
        help="Path of the node's control socket (default: SHOAL_CONTROL_SOCKET, else found).",
        envvar="SHOAL_CONTROL_SOCKET",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON reply.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error a newcomer can act on, and exit non-zero (no traceback)."""
    typer.echo(f"shoal: {message}", err=True)
    raise typer.Exit(code)


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
            "Start one (e.g. `.venv/bin/hi` or `./scripts/run`), or pass --socket PATH "
            "if it uses SHOAL_CONTROL_SOCKET."
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
    typer.echo(json.dumps(value, indent=2, default=str))


@app.command()
def cookie() -> None:
    """Print a new strong RELEASE_COOKIE (256 random bits); give every node of a cluster the same.

    Example: `export RELEASE_COOKIE=$(shoal cookie)`.
    """
    from shoal import crypto

    typer.echo(crypto.new_cookie())


@app.command()
def lookup(
    query: Annotated[str, typer.Argument(help="DNS name, e.g. the Cloud Map service name.")],
    dns_server: Annotated[
        str | None,
        typer.Option(
            "--dns-server",
            help="Nameserver as host:port (default: SHOAL_DNS_SERVER, else the system resolver).",
            envvar="SHOAL_DNS_SERVER",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the A/AAAA addresses DNS returns for QUERY, one per line.

    Like libcluster's `DNSPoll.lookup_all_ips`: the hosts DNS discovery would
    try to connect to.
    """
    from shoal.discovery.dns import DNSLookupError, lookup_all_ips

    try:
        ips = asyncio.run(lookup_all_ips(query, dns_server))
    except DNSLookupError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--dns-server {dns_server!r} is not host:port ({exc})")
    if not ips:
        fail(f"{query} has no A or AAAA records")
    for ip in ips:
        typer.echo(ip)


@app.command()
def status(
    node: NodeOption = None, socket: SocketOption = None, as_json: JsonOption = False
) -> None:
    """Show a running node: its name, peers, readiness, topology, cookie fingerprint."""
    result = ask(node, socket, "status")
    if as_json:
        print_json(result)
        return
    singletons = result.pop("singletons", None) or {}
    job_rows = result.pop("jobs", None) or []
    for key, value in result.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        typer.echo(f"{key + ':':<12} {value}")
    typer.echo(f"{'singletons:':<12} {'-' if not singletons else ''}")
    for name, info in singletons.items():
        info = info if isinstance(info, dict) else {"holder": info}
        typer.echo(f"  {name}: {info.get('holder') or 'nobody'} (mode {info.get('mode')})")
    typer.echo(f"{'jobs:':<12} {'-' if not job_rows else ''}")
    _print_jobs(job_rows)


def _print_jobs(rows: list[Any]) -> None:
    """One line per job: what a person asks first (when, where, how it went)."""
    for job in rows:
        if not isinstance(job, dict):
            typer.echo(f"  {job}")
            continue
        state = "running" if job.get("running") else (job.get("last_status") or "never run")
        typer.echo(
            f"  {job.get('name')}  [{job.get('schedule')} {job.get('tz')}]"
            f"  {job.get('run_strategy')}  last {job.get('last_run') or '-'}"
            f" on {job.get('ran_on') or '-'} ({state})  next {job.get('next_run') or '-'}"
            + ("" if job.get("active", True) else "  (inactive)")
        )


@app.command()
def nodes(
    node: NodeOption = None, socket: SocketOption = None, as_json: JsonOption = False
) -> None:
    """List the peers a running node is connected to (like Elixir's Node.list)."""
    result = ask(node, socket, "nodes")
    if as_json:
        print_json(result)
        return
    for name in result:
        typer.echo(name)


@app.command()
def ping(
    target: Annotated[str, typer.Argument(metavar="NODE", help="Peer's full name, name@host.")],
    node: NodeOption = None,
    socket: SocketOption = None,
) -> None:
    """Round-trip a message from the local node to a connected peer."""
    result = ask(node, socket, "ping", target)
    typer.echo(f"pong from {result['node']} in {result['rtt_ms']:.2f} ms")


@app.command()
def connect(
    target: Annotated[
        str, typer.Argument(metavar="NODE", help="name@host, host or host:port of the peer.")
    ],
    node: NodeOption = None,
    socket: SocketOption = None,
) -> None:
    """Make the local node connect to a peer (like Elixir's Node.connect)."""
    result = ask(node, socket, "connect", target)
    typer.echo(f"connected to {result['node']}")


JOB_ACTIONS = ("add", "remove", "pause", "resume", "history")


@app.command()
def jobs(
    action: Annotated[str | None, typer.Argument(help=f"One of {', '.join(JOB_ACTIONS)}.")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="The action's arguments.")] = None,
    node: NodeOption = None,
    socket: SocketOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the node's cron jobs, or change them on every node, or show a job's runs.

    `jobs add NAME SCHEDULE TASK [KEY=VALUE ...]` (max_attempts=3 backoff=2 misfire=run_once
    ...), `jobs remove NAME`, `jobs pause NAME`, `jobs resume NAME`, `jobs history NAME [N]`.
    """
    if action is not None:
        if action not in JOB_ACTIONS:
            fail(f"unknown jobs action {action!r}: use one of {', '.join(JOB_ACTIONS)}", 2)
        done = ask(node, socket, f"jobs-{action}", *(args or []))
        if as_json or action != "history":
            print_json(done)
        else:
            _print_runs(done)
        return
    result = ask(node, socket, "jobs")
    if as_json or not isinstance(result, list):
        print_json(result)
        return
    if not result:
        typer.echo("no jobs")
    _print_jobs(result)


def _print_runs(runs: list[Any]) -> None:
    """One line per run, newest first."""
    if not runs:
        typer.echo("no runs")
    for run in runs:
        error = f"  {run.get('error')}" if run.get("error") else ""
        typer.echo(
            f"  {run.get('tick')}  {run.get('status')}  attempts {run.get('attempts')}"
            f"  on {run.get('node')}  started {run.get('started_at')}"
            f"  {float(run.get('duration') or 0):.3f} s{error}"
        )


@app.command("run-job")
def run_job(
    name: Annotated[str, typer.Argument(help="Name of the job, as `shoal jobs` lists it.")],
    node: NodeOption = None,
    socket: SocketOption = None,
) -> None:
    """Run a cron job now, once, on the node that holds it."""
    result = ask(node, socket, "run-job", name)
    typer.echo(result if isinstance(result, str) else json.dumps(result, default=str))


@app.command()
def remote(node: NodeOption = None, socket: SocketOption = None) -> None:
    """Open an asyncio Python prompt inside the running node.

    Like an Elixir release's `remote`: `node` is the running shoal.Node and
    top-level `await` works. Ctrl-D leaves; the node keeps running.
    """
    path = find_socket(node, socket)
    try:
        client = control.ControlClient(path)
    except control.ControlError as exc:
        fail(not_reachable(node, path, exc))
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


def main() -> None:
    """Entry point of `.venv/bin/shoal`."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `shoal nodes | head` exits quietly
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    main()
