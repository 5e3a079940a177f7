"""The ``langfuse-mw`` command. Each subcommand registers itself in ``_COMMANDS``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TextIO

__all__ = ["build_parser", "main"]

Runner = Callable[[argparse.Namespace], int]


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {raw!r}")
    return value


# -- devserver --------------------------------------------------------------------------------


def _add_devserver(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "devserver",
        help="run a local Langfuse-compatible receiver with a trace viewer",
        description="A local stand-in for Langfuse: accepts OTLP traces on "
        "/api/public/otel/v1/traces, stores them in SQLite, serves the public read API "
        "and a trace viewer (docs/devserver.md).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    add("--port", type=int, default=3000, help="port (default %(default)s; 0 picks one)")
    add("--db", default="./langfuse-mw-dev.db", help="SQLite file, or :memory: "
        "(default %(default)s)")  # fmt: skip
    add("--public-key", default="pk-lf-dev", help="accepted public key (default %(default)s)")
    add("--secret-key", default="sk-lf-dev", help="accepted secret key (default %(default)s)")
    add("--max-traces", type=_positive_int, default=None,
        help="keep only the N traces that received data most recently")  # fmt: skip
    parser.set_defaults(run=_run_devserver)


def _run_devserver(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .devserver import DevServer

    out = out or sys.stdout
    server = DevServer(
        host=args.host,
        port=args.port,
        db=args.db,
        public_key=args.public_key,
        secret_key=args.secret_key,
        max_traces=args.max_traces,
        record_spans=False,  # a long-running server must not keep every span in memory
    )
    try:
        server.start()
    except OSError as exc:
        server.close()
        print(f"langfuse-mw devserver: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Handlers first: whoever reads the URL below may stop us at once (a script, a test).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    print(f"langfuse-mw devserver listening on {server.url}  (viewer: {server.url}/)", file=out)
    print("Point an app at it with:", file=out)
    print(f"  export LANGFUSE_BASE_URL={server.url}", file=out)
    print(f"  export LANGFUSE_PUBLIC_KEY={args.public_key}", file=out)
    print(f"  export LANGFUSE_SECRET_KEY={args.secret_key}", file=out)
    print("Ctrl-C to stop.", file=out, flush=True)
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
    print("langfuse-mw devserver stopped", file=out, flush=True)
    return 0


# -- doctor -----------------------------------------------------------------------------------


def _add_doctor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "doctor",
        help="print the effective configuration and check the Langfuse credentials",
        description="Prints every option with where its value came from (argument, env var, "
        "preset, default; the secret masked), then POSTs an empty batch to Langfuse to check "
        "that it accepts the keys. Exit status 1 when it does not.",
    )
    parser.add_argument("--no-check", action="store_true", help="only print the configuration")
    parser.set_defaults(run=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .doctor import run

    try:
        return run(sys.stdout, check=not args.no_check)
    except (ConfigError, TypeError) as exc:
        print(f"langfuse-mw doctor: invalid configuration: {exc}", file=sys.stderr)
        return 2


# -- forward ----------------------------------------------------------------------------------


def _add_forward(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "forward",
        help="drain the Redis stream of encoded batches into Langfuse (docs/enterprise.md)",
        add_help=False,  # the forwarder's own parser answers --help
    )
    parser.set_defaults(run=_run_forward)


def _run_forward(args: argparse.Namespace) -> int:  # pragma: no cover - main() dispatches
    return _forward([])


def _forward(argv: list[str]) -> int:
    # Imported here so the other subcommands never load redis.
    from .queue.forwarder import main as forward

    return forward(argv)


# -- the command ------------------------------------------------------------------------------

# Subcommands in the order `--help` lists them.
_COMMANDS: Sequence[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = (
    _add_devserver,
    _add_doctor,
    _add_forward,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``langfuse-mw`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="langfuse-mw", description="langfuse_mw tools: trace HTTP requests into Langfuse."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``langfuse-mw`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forward"]:  # its options belong to the forwarder's own parser
        return _forward(argv[1:])
    args = build_parser().parse_args(argv)
    run: Runner = args.run
    return run(args)
