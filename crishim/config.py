"""One typed configuration: TOML file < environment (CRISHIM_*) < command-line flags.

Names follow containerd's CRI plugin where one exists (stream_server_address,
stream_server_port, stream_idle_timeout, enable_tls_streaming, ...).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crishim.budget import FloodLimits
from crishim.ports import netns_path_problem
from crishim.runtime import HOST

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 100 * 365 * 86400.0  # seconds; beyond it the event loop's timers overflow


class ConfigError(ValueError):
    """A setting has a value crishim cannot use; the message names the setting."""


def parse_duration(text: str | int | float, name: str = "duration") -> float:
    """Go-style durations ("4h", "1m30s", "250ms") or plain seconds, as float seconds:
    finite, not negative, at most MAX_DURATION (nan would pass every comparison a limit
    makes and fail deep in the event loop; inf or 1e300 overflow its timers)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s)
        except ValueError:
            pos, value = 0, 0.0
            for m in _DURATION_PART.finditer(s):
                if m.start() != pos:
                    break
                value += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name}: {text!r} is not a duration (examples: 30s, 1m, 4h, 1h30m)")
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {text}")
    if value > MAX_DURATION:
        raise ConfigError(f"{name}: {text!r} is more than {MAX_DURATION:.0f}s (100 years)")
    return value


def format_duration(seconds: float) -> str:
    """The Go-style form parse_duration reads back: 14400 -> "4h", 0.005 -> "5ms",
    90 -> "1m30s"."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    left, parts = int(seconds), []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class Setting:
    help: str
    kind: str  # "str" | "int" | "bool" | "duration" | "map" | "choice"
    choices: tuple[str, ...] = ()


@dataclass
class Config:
    """Every crishim setting; see SETTINGS for the help text of each."""

    socket: str = "/run/crishim/crishim.sock"
    stream_server_address: str = "127.0.0.1"
    stream_server_port: int = 0
    stream_url_host: str = ""
    stream_idle_timeout: float = 4 * 3600.0
    stream_creation_timeout: float = 30.0
    stream_request_timeout: float = 10.0
    dial_timeout: float = 20.0
    token_ttl: float = 60.0
    max_tokens: int = 1000
    max_sessions: int = 10000
    max_unadmitted: int = 256
    error_policy: str = "quiet"
    runtime: str = ""
    netns_dir: str = "/var/run/netns"
    sandboxes: dict[str, str] = field(default_factory=dict)
    upstream_endpoint: str = ""
    upstream_version: bool = True
    enable_tls_streaming: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    metrics_address: str = ""
    log_format: str = "text"
    log_level: str = "info"
    drain_timeout: float = 10.0
    pod_ip_fallback: bool = False
    helper_socket: str = "/run/crishim/helper.sock"
    helper_mode: str = "fd"
    helper_max_requests: int = 1024
    buffer_size: int = 256 * 1024
    max_sandbox_id_length: int = 256
    max_port_forward_ports: int = 64
    max_request_bytes: int = 64 * 1024
    max_cri_calls: int = 4096
    max_cri_connections: int = 64
    cri_idle_timeout: float = 300.0
    max_connections_per_session: int = 4096
    max_connections: int = 65536
    reserved_fds: int = 256
    memory_release_sessions: int = 64
    memory_release_interval: float = 10.0
    enable_udp_portforward: bool = True
    udp_flow_idle_timeout: float = 60.0
    # the flood limits: their defaults are FloodLimits' (crishim/budget.py, with the why)
    control_frames_per_second: int = int(FloodLimits.control_frames_per_second)
    control_frame_burst: int = FloodLimits.control_frame_burst
    stream_opens_per_second: int = int(FloodLimits.stream_opens_per_second)
    stream_open_burst: int = FloodLimits.stream_open_burst
    protocol_error_log_lines: int = FloodLimits.protocol_error_log_lines
    log_lines_per_second: int = int(FloodLimits.log_lines_per_second)
    session_buffer_size: int = FloodLimits.session_buffer_size
    buffer_budget: int = FloodLimits.buffer_budget
    read_turn: float = FloodLimits.read_turn

    def chosen_runtime(self) -> tuple[str, str]:
        """The runtime plugin to load and why: an explicit choice wins; otherwise a proxy
        (upstream_endpoint set) resolves sandboxes through its upstream, as a drop-in must."""
        if self.runtime:
            return self.runtime, "set by runtime"
        if self.upstream_endpoint:
            return "containerd", ("upstream_endpoint is set and no runtime was chosen: "
                                  "sandboxes are resolved through the upstream")
        return "netns", "the default without upstream_endpoint"

    def validate(self) -> Config:
        for name, setting in SETTINGS.items():
            if setting.kind == "choice" and getattr(self, name) not in setting.choices:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(setting.choices)}"
                )
        if not 0 <= self.stream_server_port <= 65535:
            raise ConfigError(f"stream_server_port: {self.stream_server_port} is not in 0..65535")
        for name in ("max_tokens", "max_sessions", "max_unadmitted", "buffer_size",
                     "max_sandbox_id_length", "max_port_forward_ports", "max_request_bytes",
                     "max_cri_calls", "max_cri_connections",
                     "max_connections_per_session", "max_connections", "helper_max_requests",
                     "control_frames_per_second", "control_frame_burst",
                     "stream_opens_per_second", "stream_open_burst", "session_buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        for name in ("reserved_fds", "memory_release_sessions", "protocol_error_log_lines",
                     "log_lines_per_second",
                     "buffer_budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        # 0 is no "off" for these: a request timeout of 0 answered every upgrade 408, a
        # creation timeout of 0 failed every pair (stream_idle_timeout 0 is: no idle close)
        for name in ("udp_flow_idle_timeout", "dial_timeout", "read_turn", "token_ttl",
                     "stream_request_timeout", "stream_creation_timeout", "cri_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for name in ("stream_idle_timeout", "drain_timeout"):  # 0: never / at once
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        if self.session_buffer_size > MAX_WINDOW:
            # HTTP/2 windows are 31-bit: a larger one failed every HTTP/2 connection
            raise ConfigError(f"session_buffer_size: at most {MAX_WINDOW} (HTTP/2's largest "
                              "window)")
        # relative paths would be read in crishim's working directory: a dial of each
        # then failed, after serve had started and issued URLs
        for sandbox_id, path in self.sandboxes.items():
            problem = "" if path == HOST else netns_path_problem(path)
            if problem:
                raise ConfigError(f"sandboxes: {sandbox_id!r}: {problem} (or 'host')")
        problem = netns_path_problem(self.netns_dir)
        if problem:
            raise ConfigError(f"netns_dir: {problem}")
        problem = netns_path_problem(self.socket)  # the same rule: an absolute path
        if problem:
            # gRPC bound "unix://rel.sock" at /rel.sock, and the chmod after it failed
            raise ConfigError(f"socket: {problem}")
        if not self.stream_server_address:
            # it listened on every IPv4 address and, on another port, every IPv6 one
            raise ConfigError("stream_server_address: empty: give the address to listen on "
                              "(0.0.0.0 for every IPv4 address, :: for every IPv6 one)")
        problem = upstream_problem(self.upstream_endpoint, self.socket)
        if problem:
            raise ConfigError(f"upstream_endpoint: {problem}")
        problem = host_problem(self.stream_url_host)
        if problem:
            raise ConfigError(f"stream_url_host: {problem}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file: give both or neither")
        if self.metrics_address:
            host_port(self.metrics_address, "metrics_address")
        return self


def upstream_problem(endpoint: str, socket: str) -> str:
    """Why endpoint cannot be the upstream runtime's CRI socket, or "": it must be an
    absolute path, bare or as unix:///PATH (unix:/PATH), as the kubelet names a runtime. A
    relative path was taken by gRPC for a DNS name (every call then failed UNAVAILABLE,
    "hostname lookup error"), and crishim's own socket passed each call to itself until
    its deadline."""
    if not endpoint:
        return ""
    path = endpoint.removeprefix("unix://") if endpoint.startswith("unix://") \
        else endpoint.removeprefix("unix:")
    if not path.startswith("/"):
        return (f"{endpoint!r} is not an absolute path or unix:///PATH (the real runtime's "
                "CRI socket)")
    if os.path.normpath(path) == os.path.normpath(socket):
        return f"{endpoint!r} is crishim's own socket (--socket): calls would loop to itself"
    return ""


# HTTP/2's largest flow-control window (RFC 9113 6.9.1)
MAX_WINDOW = 2**31 - 1
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_problem(host: str) -> str:
    """Why host cannot go into an issued URL and a certificate, or "" (empty: the listen
    address): an IP address (IPv6 with or without brackets) or an ASCII DNS name. A
    non-ASCII one made the TLS certificate raise; one with a space was written into URLs."""
    if not host:
        return ""
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]")
                             else host)
        return ""
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return (f"{host!r} is not an IP address or a DNS name (ASCII letters, digits and "
                "hyphens; an internationalised name in its xn-- form)")
    return ""


def host_port(address: str, name: str, lowest: int = 1) -> tuple[str, int]:
    """HOST:PORT ([V6]:PORT; an empty host: every address) as (host, port lowest..65535)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or len(port) > 5 \
            or not lowest <= int(port) <= 65535 \
            or host.count(":") and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"{name}: {address!r} is not HOST:PORT (port {lowest}..65535; an "
                          "IPv6 host in brackets)")
    return host.strip("[]") or "0.0.0.0", int(port)


SETTINGS: dict[str, Setting] = {
    "socket": Setting("unix socket the CRI gRPC service listens on", "str"),
    "stream_server_address": Setting("address the stream server listens on", "str"),
    "stream_server_port": Setting("stream server port; 0 picks a free one (the URL carries it)",
                                  "int"),
    "stream_url_host": Setting("host written into issued URLs (default: the listen "
                               "address; for a wildcard, 127.0.0.1 or ::1)", "str"),
    "stream_idle_timeout": Setting("close a streaming session idle this long (e.g. 4h; 0: "
                                   "never)", "duration"),
    "stream_creation_timeout": Setting("a forwarded connection's stream pair must be complete "
                                       "within this (e.g. 30s)", "duration"),
    "stream_request_timeout": Setting("a connection must send its whole upgrade request "
                                      "within this (else 408), or on HTTP/2 get its first "
                                      "stream's token redeemed (else GOAWAY)", "duration"),
    "dial_timeout": Setting("a connect into the sandbox that has not completed after this "
                            "long fails that connection, as a refused one does (a port "
                            "whose SYNs are dropped: else ~2 min of kernel retries)",
                            "duration"),
    "token_ttl": Setting("how long an issued URL stays redeemable (e.g. 1m)", "duration"),
    "max_tokens": Setting("most outstanding URLs; past it PortForward is RESOURCE_EXHAUSTED",
                          "int"),
    "max_sessions": Setting("most live streaming sessions; past it upgrades get 429", "int"),
    "max_unadmitted": Setting("most stream connections that have not presented a token "
                              "yet; past it the one that waited longest is dropped (503)",
                              "int"),
    "error_policy": Setting("quiet: a refused/reset connection ends only itself (error stream "
                            "closed empty); verbose: always write the reason (as containerd)",
                            "choice", ("quiet", "verbose")),
    "runtime": Setting("runtime plugin (entry point in group crishim.runtimes; see "
                       "`crishim plugins`); empty: containerd when upstream_endpoint is "
                       "set, else netns", "str"),
    "netns_dir": Setting("directory of named network namespaces (netns plugin)", "str"),
    "sandboxes": Setting("explicit sandbox id -> netns path map (TOML table; env/flag: "
                         "id=path,id=path)", "map"),
    "upstream_endpoint": Setting("real runtime's CRI socket (an absolute path or "
                                 "unix:///PATH); every other CRI call is passed through to "
                                 "it", "str"),
    "upstream_version": Setting("with upstream_endpoint: answer Version with the upstream's "
                                "answer (the kubelet reports it as the node's runtime); "
                                "off: answer crishim's own", "bool"),
    "enable_tls_streaming": Setting("serve the stream server over TLS (self-signed unless a "
                                    "certificate is given)", "bool"),
    "tls_cert_file": Setting("stream server TLS certificate (PEM)", "str"),
    "tls_key_file": Setting("stream server TLS key (PEM)", "str"),
    "metrics_address": Setting("HOST:PORT for the Prometheus endpoint; empty: off", "str"),
    "log_format": Setting("log lines as text or json", "choice", ("text", "json")),
    "log_level": Setting("debug, info, warning or error", "choice",
                         ("debug", "info", "warning", "error")),
    "drain_timeout": Setting("on SIGTERM, live sessions get this long before they are "
                             "closed (CRI calls are served meanwhile); then new CRI calls are "
                             "refused and those in progress get what is left of it (at least "
                             "1 s); event streams end at once", "duration"),
    "pod_ip_fallback": Setting("when localhost in the sandbox refuses, dial the pod IP",
                               "bool"),
    "helper_socket": Setting("unix socket of `crishim helper` (helper plugin)", "str"),
    "helper_mode": Setting("helper plugin: fd (socket passed back) or socat (nsenter+socat)",
                           "choice", ("fd", "socat")),
    "helper_max_requests": Setting("`crishim helper`: requests it serves at once (in socat "
                                   "mode each live relay, one socat process, is one); past "
                                   "it a request is answered 'busy' at once", "int"),
    "buffer_size": Setting("bytes towards pods one session may hold before its reading "
                           "pauses (data for pods still dialling or not taking it, pairs not "
                           "yet complete); its output towards the client may hold 4x this",
                           "int"),
    "max_sandbox_id_length": Setting("longest pod_sandbox_id PortForward accepts, in bytes "
                                     "(longer: INVALID_ARGUMENT)", "int"),
    "max_port_forward_ports": Setting("most distinct ports in one PortForward request "
                                      "(more, or over 16 times as many listed: "
                                      "INVALID_ARGUMENT)", "int"),
    "max_request_bytes": Setting("largest PortForward/Version request crishim decodes "
                                 "itself (calls passed through: 16 MiB, the kubelet's "
                                 "limit)", "int"),
    "max_cri_calls": Setting("most CRI calls in progress at once on the CRI socket, every "
                             "connection together (past it a call gets RESOURCE_EXHAUSTED); "
                             "a quarter of it on one connection (past that a call waits for "
                             "one of its connection's to end)", "int"),
    "max_cri_connections": Setting("most connections to the CRI socket at once (the kubelet "
                                   "keeps one or two); past it a new one is closed before "
                                   "its handshake. They come out of reserved_fds", "int"),
    "cri_idle_timeout": Setting("a connection to the CRI socket with no call in progress "
                                "this long is closed (GOAWAY; a gRPC client connects again "
                                "at its next call), so idle ones do not hold "
                                "max_cri_connections (e.g. 5m)", "duration"),
    "max_connections_per_session": Setting("most live forwarded connections in one streaming "
                                           "session (at most half of the global limit); past "
                                           "it new streams are refused", "int"),
    "max_connections": Setting("most live forwarded connections in all sessions", "int"),
    "reserved_fds": Setting("file descriptors kept free for accepting and refusing clients: "
                            "sessions and forwarded connections hold at most RLIMIT_NOFILE "
                            "less this (past it: 503 / refused streams)", "int"),
    "memory_release_sessions": Setting("after this many sessions have ended since a high "
                                       "(and at most a quarter of it is left; connections "
                                       "without a token count as sessions), give freed "
                                       "memory back to the system (malloc_trim); 0: never",
                                       "int"),
    "memory_release_interval": Setting("memory is given back at most this often (e.g. 10s)",
                                       "duration"),
    "enable_udp_portforward": Setting("offer crishim's port-forward extension (UDP flows, "
                                      "stream protocol portforward.crishim.dev/v1) to "
                                      "crishim's own client; off: plain portforward.k8s.io",
                                      "bool"),
    "udp_flow_idle_timeout": Setting("a forwarded UDP flow with no datagram either way for "
                                     "this long ends (e.g. 60s)", "duration"),
    "control_frames_per_second": Setting("frames one session may send that cost work or an "
                                         "answer but forward nothing (PING, SETTINGS, "
                                         "PRIORITY, resets of streams without a live "
                                         "connection, refused or erroneous frames); past "
                                         "it and the burst the session ends (SPDY GOAWAY, "
                                         "HTTP/2 GOAWAY ENHANCE_YOUR_CALM, WebSocket 1008)",
                                         "int"),
    "control_frame_burst": Setting("control frames one session may send at once before "
                                   "control_frames_per_second applies", "int"),
    "stream_opens_per_second": Setting("streams one session may open a second (two per "
                                       "forwarded connection on SPDY and HTTP/2); past it "
                                       "and the burst the session ends as above", "int"),
    "stream_open_burst": Setting("streams one session may open at once before "
                                 "stream_opens_per_second applies", "int"),
    "log_lines_per_second": Setting("per-connection lines one session logs a second, and "
                                    "lines about refused stream requests the server logs a "
                                    "second (bursts of 10x); the rest are counted: 'N more "
                                    "... not logged', a second later. 0: every line", "int"),
    "protocol_error_log_lines": Setting("protocol-error lines one session logs; the rest "
                                        "are counted in one line when it ends", "int"),
    "session_buffer_size": Setting("bytes towards pods one HTTP/2 connection (or SPDY "
                                   "session with windows, docs/protocol.md 8.6) may hold: its "
                                   "receive window; a stream's is a quarter of it", "int"),
    "buffer_budget": Setting("bytes towards pods all sessions together may hold: each "
                             "HTTP/2 connection (and SPDY session with windows) takes its "
                             "window beyond 64 KiB from it as the client fills it, up to "
                             "session_buffer_size (once it is spent windows stop growing), "
                             "and a "
                             "WebSocket channel session what it holds beyond 64 KiB (one that "
                             "would pass it is closed 1013); as much again, a pool of its own, "
                             "towards clients: each session's output may hold 4 x buffer_size "
                             "and a pod read while it lasts, 64 KiB once it is spent (granted "
                             "later, oldest first, as sessions holding it end)", "int"),
    "read_turn": Setting("CPU one session's input may take before other sessions get "
                         "theirs (e.g. 5ms): past it the session waits one turn of the "
                         "event loop, and its reads shrink until one fits", "duration"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def setting_text(name: str, value: Any) -> str:
    """A setting's value as one would write it (--help's defaults): "4h", not 14400.0."""
    kind = SETTINGS[name].kind
    if kind == "duration":
        return format_duration(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "map":
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value) if value != "" else "none"


# CRISHIM_ variables that are not settings but are read by the benchmarks and tests
_OTHER_ENV = {"CRISHIM_KEEP_LOGS", "CRISHIM_PROBE", "CRISHIM_PROFILE"}


def unknown_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """CRISHIM_ variables that name no setting (a misspelt one is otherwise silently
    ignored, where the same key in the TOML file is an error)."""
    env = os.environ if env is None else env
    known = {"CRISHIM_" + name.upper() for name in SETTINGS} | _OTHER_ENV
    return sorted(v for v in env if v.startswith("CRISHIM_") and v not in known)


def _coerce(name: str, value: Any) -> Any:
    setting = SETTINGS[name]
    kind = setting.kind
    try:
        if kind == "duration":
            return parse_duration(value, name)
        if kind == "int":
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError  # 1.5 is not silently 1
            if isinstance(value, str) and not _INTEGER.fullmatch(value):
                raise ValueError  # int() took " 10", "1_000" and other scripts' digits
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind == "map":
            if isinstance(value, Mapping):
                return {str(k): str(v) for k, v in value.items()}
            result = {}
            for item in filter(None, (p.strip() for p in str(value).split(","))):
                key, sep, path = item.partition("=")
                if not sep or not key:
                    raise ValueError
                if key in result:  # the last one silently won
                    raise ConfigError(f"{name}: {key!r} is given twice")
                result[key] = path
            return result
        return str(value)
    except ConfigError:
        raise  # parse_duration's own words: negative, too long, the examples
    except (TypeError, ValueError, OverflowError):  # int(inf): OverflowError
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


_INTEGER = re.compile(r"[+-]?[0-9]+")
# what a TOML value of each kind of setting must be (the string "10" for an int, or 5 for
# a path, was converted: `socket = 5` bound a socket named /5)
_TOML_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "bool": ((bool,), "true or false"),
    "duration": ((str, int, float), "a duration (\"30s\") or a number of seconds"),
    "choice": ((str,), "a string"),
    "str": ((str,), "a string"),
    "map": ((dict, str), "a table of id = path (or \"id=path,...\")"),
}


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then CRISHIM_* variables, then flags."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 (byte {e.start})") from None
        for key, value in data.items():
            if key not in SETTINGS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            wanted = _TOML_TYPES[SETTINGS[key].kind]
            if not isinstance(value, wanted[0]) or isinstance(value, bool) != (
                    wanted[0] == (bool,)):
                raise ConfigError(f"config file {path}: {key}: {value!r} is not {wanted[1]}")
            values[key] = _coerce(key, value)
    env = os.environ if env is None else env
    for name in SETTINGS:
        var = "CRISHIM_" + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var])
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return Config(**values).validate()


