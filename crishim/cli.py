"""crishim's command line: serve | port-forward | check | helper | plugins | version."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from crishim import __version__

# gRPC's C core writes its own lines to stderr, past crishim's log: per call for what a
# CRI client sends (`E... Ignoring key value pair due to size limit` for oversized
# metadata, answered RESOURCE_EXHAUSTED anyway), unbounded. Off unless asked for; read
# when grpc is first imported, so set before anything imports it
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
try:  # ~40 ms of imports (asyncio among them) before main() can catch a Ctrl-C
    from crishim.config import (
        SETTINGS,
        Config,
        ConfigError,
        host_port,
        load,
        setting_text,
        unknown_environment,
    )
except KeyboardInterrupt:  # as main(): exit status 130, no traceback
    raise SystemExit(130) from None

log = logging.getLogger("crishim")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve", help="serve the CRI socket and the stream server",
        description="Serve the CRI gRPC socket (PortForward answered here, every other CRI "
                    "method passed through to upstream_endpoint, Version too unless "
                    "upstream_version is off) and the stream server its URLs point at. "
                    "With an upstream and no runtime chosen, the containerd plugin resolves "
                    "sandboxes through it. Settings come from the TOML file (--config), "
                    "then CRISHIM_<NAME> environment variables, then these flags. Durations "
                    "are Go-style (5ms, 30s, 1h30m) or plain seconds.")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (names as below, "
                   "with underscores)")
    p.add_argument("--demo", action="store_true",
                   help="create a demo sandbox netns with an HTTP server on port 8080 and a "
                        "UDP echo server on port 5353, registered as sandbox id 'demo'; "
                        "deleted on exit")
    p.add_argument("--stream-address", metavar="HOST:PORT",
                   help="shorthand for --stream-server-address and --stream-server-port")
    defaults = Config()
    for name, setting in SETTINGS.items():
        default = getattr(defaults, name)
        kw: dict[str, Any] = {"dest": name, "default": None,
                    "help": f"{setting.help} [default: {setting_text(name, default)}]"}
        if setting.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif setting.kind == "choice":
            kw["choices"] = setting.choices
        else:
            kw["metavar"] = {"int": "N", "duration": "DURATION", "map": "ID=PATH,..."}.get(
                setting.kind, "VALUE")
        p.add_argument(_flag(name), **kw)
    p.set_defaults(func=cmd_serve)


def _serve_config(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name) for name in SETTINGS}
    if args.stream_address:
        both = [f for f, name in (("--stream-server-address", "stream_server_address"),
                                  ("--stream-server-port", "stream_server_port"))
                if getattr(args, name) is not None]
        if both:  # which one won was silent: --stream-address, whatever the order
            raise ConfigError(f"--stream-address and {' and '.join(both)}: give one of "
                              "them")
        host, port = host_port(args.stream_address, "--stream-address", lowest=0)
        overrides["stream_server_address"] = host
        overrides["stream_server_port"] = port
    return load(args.config, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from crishim import logs
    from crishim.app import Crishim, run_until_signalled
    from crishim.demo import DemoAlreadyRunning
    from crishim.runtime import RuntimeError_
    from crishim.sysutil import SocketInUse

    config = _serve_config(args)
    logs.setup(config.log_format, config.log_level)
    for var in unknown_environment():
        log.warning("%s is not a setting: ignored (settings are CRISHIM_ and a name from "
                    "crishim serve --help, in capitals)", var)
    demo = None
    if args.demo:
        from crishim.demo import DEMO_SANDBOX, Demo

        demo = Demo()
        if config.chosen_runtime()[0] != "netns":
            log.info("--demo: serving named netns and the demo sandbox in process")

    async def main() -> None:
        try:
            plugin = None
            if demo is not None:
                await demo.start()
                plugin = demo.runtime(config)
            app = Crishim(config, plugin)

            async def announce() -> None:
                if demo is not None:
                    sock = config.socket
                    print(f"crishim demo: CRI socket {sock}\n"
                          f"crishim demo: sandbox id {DEMO_SANDBOX!r} (netns {demo.netns_path},"
                          f" HTTP server on port 8080, UDP echo on 5353 inside)\n"
                          f"crishim demo: try:  crishim port-forward {DEMO_SANDBOX} 8080:8080 "
                          f"--runtime-endpoint unix://{sock}   then   "
                          f"curl http://127.0.0.1:8080/\n"
                          f"crishim demo: UDP:  crishim port-forward {DEMO_SANDBOX} "
                          f"15353:5353/udp --runtime-endpoint unix://{sock}   then   "
                          f"echo hi | nc -u -w1 127.0.0.1 15353\n"
                          f"crishim demo: Ctrl-C stops crishim and deletes the netns",
                          flush=True)

            await run_until_signalled(app, announce)
        finally:
            if demo is not None:
                await demo.stop()

    try:
        uvloop.run(main())
    except (SocketInUse, RuntimeError_, ConfigError, DemoAlreadyRunning, OSError) as e:
        # a start-up failure a person can act on (address in use, no permission, ...)
        print(f"crishim: {e}", file=sys.stderr)
        return 1
    return 0


VERSION_LINE = f"crishim {__version__} (CRI runtime.v1)"  # `version` and `--version` alike


def cmd_version(args: argparse.Namespace) -> int:
    print(VERSION_LINE)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from crishim.runtime import ENTRY_POINT_GROUP

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    if not eps:
        print("no runtime plugins installed")
        return 1
    for ep in eps:
        try:
            obj = ep.load()
            doc = obj.__doc__ or sys.modules[obj.__module__].__doc__ or ""
            doc = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph
        except Exception as e:  # a broken plugin is listed, not fatal
            doc = f"(cannot load: {e})"
        print(f"{ep.name:12} {ep.value:40} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crishim", description="A pluggable CRI streaming server and its client.")
    parser.add_argument("--version", action="version", version=VERSION_LINE)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_serve(sub)
    from crishim.helper import agent as helper_agent

    helper_agent.add_command(sub)
    from crishim.client import cli as client_cli

    client_cli.add_commands(sub)
    v = sub.add_parser("version", help="print crishim's version")
    v.set_defaults(func=cmd_version)
    pl = sub.add_parser("plugins", help="list the installed runtime plugins")
    pl.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # building the parser imports every command's modules (~0.2 s): Ctrl-C there too
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except ConfigError as e:  # a setting crishim cannot use: a start-up failure like any
        print(f"crishim: {e}", file=sys.stderr)  # other (usage errors stay 2, argparse's)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
