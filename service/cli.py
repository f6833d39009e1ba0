"""Command line: `batchwise serve` and `batchwise health` (also `python -m service ...`).

Flags are generated from the fields of `Settings`, so every setting has a flag,
an environment variable (BATCHWISE_<NAME>) and a help line, and they cannot
drift apart. Precedence: flag, then environment variable, then default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import StartupError
from .logs import configure_logging
from .settings import Settings, env_name, from_environment

log = logging.getLogger(__name__)

_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "Path": Path}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for spec in dataclasses.fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        meta = spec.metadata
        default = (
            "the embedded models/repository" if spec.name == "model_repository" else spec.default
        )
        help_text = f"{meta['help']} [env {env_name(spec.name)}; default {default}]"
        if spec.type == "bool":
            parser.add_argument(
                flag,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=spec.name,
                type=_TYPES[str(spec.type)],
                default=None,
                choices=meta["choices"],
                help=help_text,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchwise",
        description="Triton-compatible gRPC inference server for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"batchwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve every model in a Triton-style model repository over the "
        "inference.GRPCInferenceService protocol, with Prometheus metrics on a second port.",
    )
    _add_setting_flags(serve)
    health = commands.add_parser(
        "health",
        help="ask a running server's grpc.health.v1 service whether it serves (exit 0 if so)",
        description="Probe a server through grpc.health.v1, as Docker HEALTHCHECK and "
        "compose's service_healthy need: exit 0 when SERVING, 1 otherwise.",
    )
    health.add_argument(
        "--address",
        default=None,
        help=f"host:port of the gRPC server [default 127.0.0.1 and {env_name('grpc_port')} "
        "or 8001]",
    )
    health.add_argument(
        "--model",
        default="",
        help="check one model's health instead of the whole server's",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer [default 3]"
    )
    health.add_argument(
        "--tls-ca", type=Path, help="speak TLS, trusting the server certificate this CA signed"
    )
    health.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    health.add_argument("--tls-key", type=Path, help="client private key, for mutual TLS")
    health.add_argument(
        "--tls-server-name", help="name to verify in the server certificate (default: the host)"
    )
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    values = from_environment()
    for spec in dataclasses.fields(Settings):
        given = getattr(arguments, spec.name, None)
        if given is not None:
            values[spec.name] = given
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "health":
        return _health(arguments, parser)
    try:
        settings = settings_from(arguments)
    except ValueError as error:
        parser.error(str(error))
    configure_logging(settings.log_level_number, settings.log_format, settings.access_log)
    if arguments.command == "serve":
        from .supervisor import Supervisor, frontend_count

        frontends = frontend_count(settings)
        if frontends > 0:
            return Supervisor(settings, frontends).run()
        from .app import FatalServerError, serve  # imports onnxruntime; keep --help fast
        from .fatal import EXIT_CODE

        try:
            run_event_loop(serve(settings), settings.event_loop)
        except StartupError as error:
            log.error("cannot start: %s", error)
            return 1
        except FatalServerError as error:
            log.critical("exiting with status %d after a fatal runtime error: %s", EXIT_CODE, error)
            # Not a normal return: threads stuck on a broken device would block interpreter
            # exit (executor joins); the orchestrator needs the process gone.
            logging.shutdown()
            os._exit(EXIT_CODE)
    return 0


def run_event_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run `main` on uvloop or asyncio's loop, as `--event-loop` says."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise StartupError(
                    "--event-loop uvloop: uvloop is not installed (pip install uvloop)"
                ) from None
        else:
            log.info("event loop: uvloop %s", getattr(uvloop, "__version__", "?"))
            uvloop.run(main)
            return
    log.info("event loop: asyncio")
    asyncio.run(main)


def _health(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .grpc_api.health_probe import ProbeTls, probe

    address = arguments.address
    if address is None:
        try:
            port = from_environment().get("grpc_port", 8001)
        except ValueError as error:
            parser.error(str(error))
        address = f"127.0.0.1:{port}"
    if arguments.timeout <= 0:
        parser.error(f"--timeout {arguments.timeout}: expected a number of seconds above 0")
    tls = None
    if arguments.tls_ca is not None:
        if (arguments.tls_cert is None) != (arguments.tls_key is None):
            parser.error("--tls-cert and --tls-key go together")
        tls = ProbeTls(
            arguments.tls_ca, arguments.tls_cert, arguments.tls_key, arguments.tls_server_name
        )
    elif arguments.tls_cert is not None or arguments.tls_key is not None:
        parser.error("--tls-cert/--tls-key need --tls-ca")
    try:
        serving, description = probe(address, arguments.model, arguments.timeout, tls)
    except OSError as error:
        parser.error(f"cannot read a TLS file: {error}")
    sys.stdout.write(description + "\n")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
