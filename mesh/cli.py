"""`meshkit <command>`: parse options, set up logs and signals, hand over to the component.

Each command's module is imported only when that command runs. Option errors are printed once, all
together, and exit 2; a daemon that cannot start (port taken, ...) exits 1 with one line. Nobody sees a
traceback for a mistake of theirs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshkit import __version__
from meshkit.errors import ConfigError, MeshkitError

if TYPE_CHECKING:
    from meshkit.daemon import Daemon


@dataclass(frozen=True)
class Command:
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]
    takes_config: bool = True  # a `--config FILE` with a section named after the command


# -- daemons: one line each; the module's DAEMON (a meshkit.daemon.Daemon) does the rest -------------
DAEMONS: dict[str, tuple[str, str]] = {
    "extproc": ("meshkit.extproc.daemon", "the ext_proc / ext_authz server: one filter chain, three APIs"),
    "echo": ("meshkit.echo", "a small HTTP upstream that answers with what it received (JSON)"),
    "dev-upstream": (
        "meshkit.sidecars.dev_upstream",
        "an OpenAI-compatible stand-in provider: embeddings, chat (SSE), /stats, fail/slow switches",
    ),
    "purge-broadcaster": (
        "meshkit.sidecars.purge_broadcaster",
        "fans a PURGE out to every Varnish pod (static, dns: or k8s: targets) and answers once all did",
    ),
    "embedding-cache": (
        "meshkit.sidecars.embedding_cache",
        "an OpenAI-compatible /v1/embeddings that caches each input item (file:// or s3:// store)",
    ),
    "sse": (
        "meshkit.edge.sse",
        "the SSE adapter: conversations' tokens from JetStream (a NATS leaf) as resumable SSE",
    ),
    "bridge": (
        "meshkit.sidecars.bridge",
        "moves LLM tokens from Redis (Streams or pub/sub) into NATS JetStream, each stored once",
    ),
}


def load_daemon(command: str) -> Daemon:
    module = importlib.import_module(DAEMONS[command][0])
    daemon: Daemon = module.DAEMON
    return daemon


def _daemon_command(command: str) -> Command:
    def setup(parser: argparse.ArgumentParser) -> None:
        from meshkit.options import add_flags

        add_flags(parser, load_daemon(command).all_sections())

    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        import logging

        from meshkit import daemon as lifecycle
        from meshkit import logs
        from meshkit.options import describe, load_yaml_section, resolve

        spec = load_daemon(command)
        resolved = resolve(
            spec.all_sections(),
            command=command,
            flags=vars(args),
            config=load_yaml_section(args.config, command),
            groups=spec.groups(),
        )
        daemon_options: lifecycle.DaemonOptions = resolved[lifecycle.DaemonOptions]
        logs.setup(daemon_options.log_format, daemon_options.log_level)
        logging.getLogger("meshkit").info(
            "starting meshkit %s %s",
            command,
            __version__,
            extra={"options": {k: v for o in resolved.values() for k, v in describe(o).items()}},
        )
        try:
            lifecycle.run(spec, resolved)
        except MeshkitError:
            raise  # one line from main()
        except Exception:  # a bug: its traceback, in the log's format (--log-format json stays JSON)
            logging.getLogger("meshkit").exception("meshkit %s stopped on an unexpected error", command)
            return 1
        return 0

    return Command(DAEMONS[command][1], setup, run)


# -- meshkit up -------------------------------------------------------------------------------------
def _setup_up(parser: argparse.ArgumentParser) -> None:
    from meshkit.up import add_arguments

    add_arguments(parser)


def _run_up(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from meshkit.up import run_up

    return run_up(args)


# -- meshkit render ---------------------------------------------------------------------------------
def _setup_render(parser: argparse.ArgumentParser) -> None:
    from meshkit.render.command import add_arguments

    add_arguments(parser)


def _run_render(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from meshkit.render.command import run

    return run(args)


COMMANDS: dict[str, Command] = {
    **{name: _daemon_command(name) for name in DAEMONS},
    "up": Command(
        "the local stack: Envoy ingress on 127.0.0.1:10000 -> meshkit -> echo upstream",
        _setup_up,
        _run_up,
        takes_config=False,
    ),
    "render": Command(
        "print the Envoy config for meshkit's filter chain (ext_proc, ext_authz gRPC or HTTP)",
        _setup_render,
        _run_render,
        takes_config=False,
    ),
    "loadgen": Command(
        "token-streaming load on meshkit sse or nginx + nchan: delivered, missing, duplicates, latency",
        lambda parser: importlib.import_module("meshkit.edge.loadgen").add_arguments(parser),
        lambda args, parser: int(importlib.import_module("meshkit.edge.loadgen").run(args)),
        takes_config=False,
    ),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshkit", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"meshkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:  # only the chosen command's options (and imports) are built
            if cmd.takes_config:
                p.add_argument(
                    "--config",
                    type=Path,
                    metavar="FILE",
                    help=f"YAML file with a {name!r} section (flags and MESHKIT_* env win over it)",
                )
            cmd.setup(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args, parser)
    except ConfigError as exc:
        print(f"meshkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except MeshkitError as exc:
        print(f"meshkit {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
