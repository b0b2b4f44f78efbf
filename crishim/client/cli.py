"""Client-side commands: `crishim port-forward` and `crishim check`."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import TextIO, cast

from crishim.client.cri import DEFAULT_ENDPOINT
from crishim.client.transports import TRANSPORTS
from crishim.client.udp import MAX_FLOWS
from crishim.memory import freeze_startup_objects, keep_heap_for_reads

MAX_SECONDS = 86400.0 * 365  # a year: beyond it the event loop's timers overflow


class StdoutUntilClosed:
    """sys.stdout for the client commands: once its reader is gone (`| head`), what is
    printed goes to /dev/null, dup2()ed onto fd 1 so the flush at exit is quiet too, and
    the command goes on (kubectl dies of SIGPIPE; SIG_DFL would kill crishim on a socket
    write too). A BrokenPipeError was a traceback, or an "Exception in callback" line per
    connection."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed_by_reader = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        try:
            self._stream.flush()  # what the buffer kept: to /dev/null now
        except OSError:
            pass  # the buffer is dropped either way; nothing is left to tell

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _quiet_when_stdout_closes() -> None:
    if not isinstance(sys.stdout, StdoutUntilClosed):
        sys.stdout = cast(TextIO, StdoutUntilClosed(sys.stdout))


def _port(text: str) -> int:
    """--port: 1 to 65535 in ASCII digits, as every port crishim parses."""
    from crishim.ports import InvalidPort, parse_port

    try:
        return parse_port(text)
    except InvalidPort as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    """--max-udp-flows: a whole number, at least 1."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, at least 1")
    return int(text)


POD_RUNNING_TIMEOUT = 60.0  # --pod-running-timeout's default, as kubectl's


def _mebibytes(text: str) -> int:
    """--size: a whole number of MiB, from 1 to what check's sink and source take (1 TiB)."""
    from crishim.client.podservers import MAX_SIZED

    most = MAX_SIZED >> 20
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB from 1 to "
                                         f"{most}")
    return int(text)


def _seconds(text: str) -> float:
    """Seconds (a bare number) or a Go-style duration (30s, 1m30s, 250ms), as crishim
    serve's settings take them; nan for what is neither (every check refuses nan)."""
    from crishim.config import ConfigError, parse_duration

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except ConfigError:
        return math.nan


def _timeout(text: str) -> float:
    """--timeout: more than 0 and finite (inf was 'timed out after infs')."""
    value = _seconds(text)
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration above 0 (seconds, or "
                                         f"as 30s, 1m30s, 250ms; at most "
                                         f"{MAX_SECONDS:.0f}s)")
    return value


def _ping_interval(text: str) -> float:
    """--ping-interval: 0 (none) or 0.1 s or more: crishim serve charges PINGs to the
    control budget (100 a second), and an interval of 1 ms ended the session in 2 s."""
    value = _seconds(text)
    if not (value == 0 or math.isfinite(value) and 0.1 <= value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (no PING) or 0.1s to "
                                         f"{MAX_SECONDS:.0f}s (seconds, or as 5s, 250ms)")
    return value


def _add_common(p: argparse.ArgumentParser, pod_get: bool = False,
                check: bool = False) -> None:
    p.add_argument("--runtime-endpoint", metavar="unix:///PATH", default=None,
                   help="the CRI runtime's socket (a bare path works too) "
                        "[default: $CONTAINER_RUNTIME_ENDPOINT or "
                        f"{DEFAULT_ENDPOINT}]")
    p.add_argument("--insecure-skip-tls-verify", action="store_true",
                   help="for https stream URLs: do not verify the server's certificate")
    p.add_argument("--certificate-authority", metavar="FILE",
                   help="for https stream URLs: trust this CA bundle (PEM)")
    p.add_argument("--timeout", type=_timeout, default=10.0, metavar="DURATION",
                   help="timeout of the CRI call, the connect, the stream server's "
                        "answer to the upgrade"
                        + (" and (--kubeconfig) each API request (the pod, service or "
                           "workload GET, each page of a pod list)" if pod_get else "")
                        + (" and each read or write of a check (a whole check takes at "
                           "most 120 s plus 1 s per MiB of --size)" if check else "")
                        + ": seconds, or a duration as 30s, 1m30s, 250ms [default: 10]")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pf = sub.add_parser(
        "port-forward", help="forward local ports to a pod sandbox through a CRI runtime "
                             "(or to a pod through an API server, with --kubeconfig)",
        description="Call the runtime's CRI PortForward for TARGET (a pod sandbox id), "
                    "upgrade to the returned "
                    "stream URL and forward local ports, as `kubectl port-forward` does. "
                    "With --kubeconfig, TARGET is a pod (pod/NAME or NAME) reached through "
                    "the API server's pods/portforward, as kubectl: the pod is checked "
                    "first, then the WebSocket tunnel is tried and SPDY used where the "
                    "server does not offer it. TARGET may also be a service (svc/NAME) "
                    "or a workload (deploy/, rs/, sts/, ds/, rc/ or job/NAME): as kubectl, the "
                    "most active pod its selector matches (waiting up to "
                    "--pod-running-timeout for one); for a service each REMOTE is a "
                    "service port (number or name) forwarded to that port's targetPort in "
                    "the pod. "
                    "PORT specs: 5000 (5000 -> 5000), 6000:5000, :5000 or 0:5000 (a free "
                    "local port); with --kubeconfig the remote port may be a container "
                    "port's name from the pod's spec (8080:http, :http; http alone listens "
                    "on its number), as kubectl: a name no container port has, or a port "
                    "the pod declares only as UDP, is kubectl's error, and a name with "
                    "/udp or /tcp picks the port of that name with that protocol; without "
                    "--kubeconfig a port is a number. "
                    "A spec ending in /udp (5353:53/udp) forwards UDP, one "
                    "flow per local peer address, where the runtime's stream server "
                    "negotiates crishim's extension (crishim serve does; containerd and "
                    "CRI-O do not, and the /udp specs are then refused with one line while "
                    "TCP specs go on); not with --transport websocket. "
                    "--transport websocket (the channel protocol) has no half-close: a "
                    "local EOF ends that connection, and what the pod answers after it is "
                    "lost. "
                    "Prints 'Forwarding from 127.0.0.1:L -> R' per listener and "
                    "'Handling connection for L' per connection. One failed connection is "
                    "reported and the session goes on; an error text from the server, or "
                    "losing the session, ends it with exit status 1 and 'error: lost "
                    "connection to pod', as kubectl (after the server's GOAWAY, live "
                    "connections go on, new ones are refused and the session is lost with "
                    "the last; with --transport websocket, where every failure is text, a "
                    "failure ends it when the runtime's CRI then says the sandbox is gone "
                    "or the runtime unavailable); Ctrl-C or SIGTERM, also while starting, "
                    "ends it with 0.")
    pf.add_argument("sandbox", metavar="TARGET",
                    help="pod sandbox id; with --kubeconfig: pod/NAME, NAME, svc/NAME or "
                         "deploy/NAME (rs/, sts/, ds/, rc/, job/)")
    pf.add_argument("ports", metavar="[LOCAL:]REMOTE[/udp]", nargs="+",
                    help="port specs; with --kubeconfig REMOTE may be a container port's "
                         "name (a service port's, for svc/NAME)")
    _add_common(pf, pod_get=True)
    pf.add_argument("--kubeconfig", metavar="FILE",
                    help="go through this cluster's API server (pods/portforward) instead "
                         "of a CRI runtime endpoint")
    pf.add_argument("--context", metavar="NAME",
                    help="with --kubeconfig: the context to use [default: current-context]")
    pf.add_argument("-n", "--namespace", metavar="NS",
                    help="with --kubeconfig: the pod's namespace [default: the context's, "
                         "else default]")
    pf.add_argument("--pod-running-timeout", type=_timeout, default=None,
                    metavar="DURATION",
                    help="with --kubeconfig and svc/NAME or a workload: how long to wait for "
                         "a pod it selects, as kubectl (seconds, or as 30s, 1m) "
                         "[default: 1m]")
    pf.add_argument("--transport", choices=TRANSPORTS + ("auto",), default=None,
                    help="stream protocol: spdy (kubectl, crictl), spdy-over-websocket "
                         "(kubectl 1.31+), websocket (v4.channel.k8s.io: one WebSocket "
                         "per local connection), h2 (crishim's HTTP/2) [default: spdy; "
                         "with --kubeconfig: auto, spdy-over-websocket falling back to "
                         "spdy; auto needs --kubeconfig]")
    pf.add_argument("--address", action="append", metavar="ADDR",
                    help="local addresses to listen on, repeatable or comma-separated: "
                         "IP addresses or 'localhost', which means 127.0.0.1 and ::1 (as "
                         "kubectl, where one of those two cannot be bound the other is "
                         "used alone; any other that cannot be bound is an error) "
                         "[default: localhost]")
    pf.add_argument("--ping-interval", type=_ping_interval, default=5.0, metavar="DURATION",
                    help="keepalive PING interval on SPDY and h2 sessions (seconds, or as "
                         "5s, 250ms), 0 for none; "
                         "a server that sends nothing at all, not even the answer, for "
                         "--timeout seconds after each of two PINGs in a row, while it "
                         "has room for all the session sent, has stalled, and the session "
                         "ends as lost [default: 5, as client-go]")
    pf.add_argument("--max-udp-flows", type=_positive, default=MAX_FLOWS, metavar="N",
                    help="most UDP flows (local peer addresses) open at once, every /udp "
                         "spec together; a new peer's datagrams past it are dropped until "
                         "a flow ends (the server ends one idle for its "
                         "udp_flow_idle_timeout) [default: %(default)s]")
    pf.set_defaults(func=cmd_port_forward)

    ck = sub.add_parser(
        "check", help="conformance and health battery for a runtime's streaming server",
        description="Run a battery of port-forward checks against any CRI runtime: URL form "
                    "and token single use on each transport the runtime speaks, each "
                    "transport's handshake, bytes both ways with "
                    "SHA-256, half-close, closed port, reset from the pod, concurrency, "
                    "setup latency, throughput and, where the server offers crishim's UDP "
                    "extension, a UDP echo. As root with the sandbox's netns known "
                    "(PodSandboxStatus verbose info, or --netns) it starts its own echo, "
                    "sink, source and reset servers in the sandbox; otherwise it uses --port "
                    "and skips the checks that need a cooperating server. Exit status 1 if "
                    "a required check fails.")
    ck.add_argument("--sandbox", required=True, metavar="ID", help="pod sandbox id")
    ck.add_argument("--port", type=_port, default=0, metavar="N",
                    help="a port that accepts connections in the sandbox (used when "
                         "crishim check cannot start its own servers)")
    _add_common(ck, check=True)
    ck.add_argument("--transport", choices=TRANSPORTS, default="spdy",
                    help="transport for the data checks; every transport's handshake is "
                         "tried regardless [default: spdy]")
    ck.add_argument("--netns", metavar="PATH",
                    help="the sandbox's network namespace, when the runtime does not report "
                         "it (crishim without an upstream runtime)")
    ck.add_argument("--no-servers", action="store_true",
                    help="do not start servers in the sandbox even when possible")
    ck.add_argument("--size", type=_mebibytes, default=8, metavar="MIB",
                    help="MiB moved each way by the SHA-256 and throughput checks "
                         "[default: 8]")
    ck.add_argument("--json", action="store_true", help="print the results as JSON")
    ck.set_defaults(func=cmd_check)


def _bad_certificate_authority(args: argparse.Namespace) -> bool:
    """Say why --certificate-authority cannot be used, once and before anything else
    (not a traceback, or every check's detail, when an https URL first needs it)."""
    from crishim.client.transports import ca_bundle_problem

    path = args.certificate_authority
    why = ca_bundle_problem(path) if path else ""
    if why:
        print(f"error: --certificate-authority {path}: {why}", file=sys.stderr)
    return bool(why)


def _endpoint(args: argparse.Namespace) -> str:
    from crishim.client.cri import default_endpoint

    return args.runtime_endpoint or default_endpoint()


def cmd_port_forward(args: argparse.Namespace) -> int:
    import uvloop

    from crishim.client import portforward
    from crishim.client.cri import CriClient, CriError

    _quiet_when_stdout_closes()
    keep_heap_for_reads()
    if _bad_certificate_authority(args):
        return 1
    if args.kubeconfig:
        return _port_forward_through_cluster(args)
    given = [flag for flag, value in (("--context", args.context),
                                      ("--namespace", args.namespace),
                                      ("--pod-running-timeout", args.pod_running_timeout))
             if value is not None and value != ""]
    if given:  # each was silently ignored without a cluster to ask
        print(f"error: {' and '.join(given)} {'needs' if len(given) == 1 else 'need'} "
              "--kubeconfig", file=sys.stderr)
        return 1
    try:
        if args.transport == "auto":
            raise portforward.UsageError("--transport auto needs --kubeconfig")
        specs = portforward.parse_port_specs(args.ports)
        addresses = portforward.listen_addresses(args.address)
        cri = CriClient(_endpoint(args), timeout=args.timeout)
    except (portforward.UsageError, CriError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    opener = portforward.cri_opener(cri, args.sandbox, args.insecure_skip_tls_verify,
                                    args.certificate_authority, args.timeout)
    freeze_startup_objects()
    with cri:
        return uvloop.run(portforward.run(
            opener, specs, args.transport or "spdy", addresses, args.ping_interval,
            args.max_udp_flows))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port_forward_through_cluster(args: argparse.Namespace) -> int:
    import uvloop

    from crishim.client import cluster, portforward

    # the pod GET blocks before the event loop (and its signal handlers) runs: Ctrl-C or
    # SIGTERM during it end the command as they do once it forwards, exit 0
    term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # kubectl's order: the object (it must exist), the most active pod it selects,
        # the ports' names, the pod's phase, then the addresses and the ports' numbers; a
        # spec or address crishim refuses is reported at its place in that order
        texts, specs, parsed = list(args.ports), [], []
        refused, refusal, address_refusal = "", None, None
        for text in texts:  # every one: kubectl translates all before it parses any
            try:
                specs.append(portforward.parse_port_spec(text, names=True))
                parsed.append(text)
            except portforward.UsageError as e:
                if refusal is None:
                    refused, refusal = text, e
        try:
            addresses = portforward.listen_addresses(args.address)
        except portforward.UsageError as e:
            address_refusal = e
        resource, name = cluster.target_of(args.sandbox)
        target = cluster.load_cluster(args.kubeconfig, args.context, args.namespace,
                                      args.insecure_skip_tls_verify,
                                      args.certificate_authority)
        cluster.ClusterForward.check_transport(args.transport or "auto")
        obj = cluster.fetch(target, resource, name, args.timeout)
        if resource == "pods":
            pod = obj
        else:
            selector = cluster.selector_of(resource, obj)
            pod = cluster.first_pod(target, selector, args.timeout,
                                    args.pod_running_timeout or POD_RUNNING_TIMEOUT)
            name = pod["metadata"]["name"]
        if resource == "services":
            specs = cluster.resolve_service_ports(parsed, specs, obj, pod)
        else:  # names are resolved before the pod's phase is looked at
            specs = cluster.resolve_named_ports(parsed, specs, pod)
        if refused:
            translation = cluster.translation_error(refused, resource, obj, pod)
            if translation is not None:
                raise translation
        cluster.check_running(pod)
        if address_refusal is not None:
            raise address_refusal
        if refusal is not None:
            raise cluster.parse_error(refused, resource, obj, pod) or refusal
        portforward.refuse_repeated_local_ports(parsed, specs)
        forward = cluster.ClusterForward(target, name, args.transport or "auto", args.timeout)
    except portforward.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except cluster.ClusterError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, term)
    freeze_startup_objects()
    return uvloop.run(portforward.run(
        forward.open, specs, forward.transport, addresses, args.ping_interval,
        args.max_udp_flows))


def cmd_check(args: argparse.Namespace) -> int:
    import uvloop

    from crishim.client import check
    from crishim.client.cri import CriClient, CriError

    _quiet_when_stdout_closes()
    if _bad_certificate_authority(args):
        return 1
    try:
        cri = CriClient(_endpoint(args), timeout=args.timeout)
    except CriError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with cri:
        return uvloop.run(check.run(cri, args))
