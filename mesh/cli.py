"""`meshkit <command>`: parse options, set up logs and signals, hand over to the component.

Each command's module is imported only when that command runs. Option errors are printed once, all
together, and exit 2; a daemon that cannot start (port taken, ...) exits 1 with one line. Nobody sees a
traceback for a mistake of theirs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshkit import __version__
from meshkit.errors import ConfigError, MeshkitError


@dataclass(frozen=True)
class Command:
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


# -- meshkit extproc --------------------------------------------------------------------------------
def _extproc_sections() -> list[type[Any]]:
    from meshkit.daemon import DaemonOptions
    from meshkit.extproc.app import ExtprocOptions
    from meshkit.extproc.filters import option_sections

    return [ExtprocOptions, DaemonOptions, *option_sections()]


def _setup_extproc(parser: argparse.ArgumentParser) -> None:
    from meshkit.options import add_flags

    add_flags(parser, _extproc_sections())


def _run_extproc(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio
    import logging

    from meshkit import daemon, logs
    from meshkit.extproc.app import ExtprocOptions, serve
    from meshkit.options import describe, load_yaml_section, resolve

    sections = _extproc_sections()
    resolved = resolve(
        sections, command="extproc", flags=vars(args), config=load_yaml_section(args.config, "extproc")
    )
    options: ExtprocOptions = resolved[ExtprocOptions]
    daemon_options: daemon.DaemonOptions = resolved[daemon.DaemonOptions]
    logs.setup(daemon_options.log_format, daemon_options.log_level)
    logging.getLogger("meshkit").info(
        "starting meshkit extproc %s",
        __version__,
        extra={"options": {k: v for o in resolved.values() for k, v in describe(o).items()}},
    )

    async def main(stop: asyncio.Event) -> None:
        await serve(options, daemon_options, resolved, stop=stop)

    daemon.run(main, daemon_options)
    return 0


# -- meshkit echo -----------------------------------------------------------------------------------
def _setup_echo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--name", default="echo", help='reported as "upstream" in every answer')


def _run_echo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from meshkit.echo import run_echo
    from meshkit.options import parse_host_port

    try:
        listen = parse_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError([f"--listen: {args.listen!r} is not valid: {exc}"]) from None
    run_echo(listen, args.name)
    return 0


# -- meshkit up -------------------------------------------------------------------------------------
def _setup_up(parser: argparse.ArgumentParser) -> None:
    from meshkit.up import add_arguments

    add_arguments(parser)


def _run_up(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from meshkit.up import run_up

    return run_up(args)


COMMANDS: dict[str, Command] = {
    "extproc": Command(
        "the ext_proc / ext_authz gRPC server (filters: body-hash)", _setup_extproc, _run_extproc
    ),
    "up": Command(
        "the local stack: Envoy ingress on 127.0.0.1:10000 -> meshkit -> echo upstream", _setup_up, _run_up
    ),
    "echo": Command(
        "a small HTTP upstream that answers with what it received (JSON)", _setup_echo, _run_echo
    ),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshkit", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"meshkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:  # only the chosen command's options (and imports) are built
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
