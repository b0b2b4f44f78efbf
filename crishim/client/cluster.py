"""`crishim port-forward --kubeconfig FILE pod/NAME|svc/NAME ...`: through an API
server's pods/portforward subresource, as kubectl does.

Credentials come from the kubeconfig through the `kubernetes` package's loader (client
certificates, bearer tokens, exec and auth-provider plugins, CA data,
insecure-skip-tls-verify), so every kubeconfig kubectl accepts works the same. From
that Configuration crishim builds its own TLS context and Authorization header and opens
its own client session: the WebSocket tunnel (SPDY over WebSocket, kubectl 1.31+) where
the server offers it, else the SPDY upgrade (client-go's fallback on a failed WebSocket
upgrade). As kubectl, the pod is fetched first: not found, or not running, is reported
before any port is bound, and a named remote port (`8080:http`) is resolved against the
pod's container ports, as kubectl's convertPodNamedPortToNumber. A service (`svc/NAME`)
or a workload (`deploy/NAME`, rs, sts, ds, rc) is kubectl's too: its selector's most
active pod, a service's ports translated to their targetPorts.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

from crishim.client.portforward import PortSpec
from crishim.client.transports import ClientSession, UpgradeRefused, open_session

# the transports an API server's pods/portforward offers; "auto" is kubectl's choice
CLUSTER_TRANSPORTS = ("auto", "spdy-over-websocket", "spdy")


class ClusterError(Exception):
    """The cluster path cannot go on; the message is the whole line to print, kubectl-like."""


class AnswerTooLarge(ClusterError):
    """An answer past its size limit."""


@dataclass
class Cluster:
    """What a kubeconfig context says about reaching its API server."""

    server: str  # scheme://host:port[/prefix]
    namespace: str
    ssl_context: ssl.SSLContext | None
    configuration: Any  # kubernetes.client.Configuration, for the pod GET and token refresh

    def auth_headers(self) -> list[tuple[str, str]]:
        """Authorization as the `kubernetes` client sends it, read per use so that a token
        from an exec plugin or auth provider is refreshed by the loader's hook."""
        cfg = self.configuration
        headers = [("Authorization" if str(s["key"]).lower() == "authorization" else s["key"],
                    s["value"]) for s in cfg.auth_settings().values()
                   if s.get("in") == "header" and s.get("value")]
        if not headers and (cfg.username or cfg.password):
            headers.append(("Authorization", cfg.get_basic_auth_token()))
        return headers


def load_cluster(kubeconfig: str, context: str | None = None, namespace: str | None = None,
                 insecure: bool = False, ca_file: str | None = None) -> Cluster:
    """Read a kubeconfig with the `kubernetes` package's loader; `insecure` and `ca_file`
    override the cluster's settings as kubectl's flags of the same names do."""
    if not os.path.exists(kubeconfig):  # the loader says "No configuration found"
        raise ClusterError(f"error: kubeconfig {kubeconfig}: no such file")
    try:
        import yaml  # type: ignore[import-untyped]
        from kubernetes import client
        from kubernetes import config as kube_config
    except ImportError as e:
        raise ClusterError(f"error: --kubeconfig needs the Python kubernetes client ({e}): "
                           "pip install 'crishim[cluster]' (deploy/install.sh installs it)"
                           ) from None

    loader: Any = kube_config  # untyped
    configuration = client.Configuration()
    try:
        if context:  # without current-context too, as kubectl (the loader's list needs it)
            with open(kubeconfig, "rb") as f:
                document = yaml.safe_load(f)
            contexts = document.get("contexts") or [] if isinstance(document, dict) else []
            chosen = next((c for c in contexts if c.get("name") == context), None)
            if chosen is None:
                raise ClusterError("Error in configuration: context was not found for "
                                   f"specified context: {context}")  # kubectl's line
        else:
            _, chosen = loader.list_kube_config_contexts(config_file=kubeconfig)
        loader.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=configuration, persist_config=False)
    except kube_config.ConfigException as e:
        raise ClusterError(f"error: kubeconfig {kubeconfig}: {e}") from None
    except OSError as e:
        raise ClusterError(f"error: kubeconfig {kubeconfig}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeError) as e:  # not YAML, not UTF-8
        why = " ".join(str(e).split())
        raise ClusterError(f"error: kubeconfig {kubeconfig}: not a YAML file: {why}") from None
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        # YAML of another shape (`clusters: 5`): the loader indexes it as it finds it
        raise ClusterError(f"error: kubeconfig {kubeconfig}: not a kubeconfig "
                           f"({type(e).__name__}: {e})") from None
    ns = namespace or ((chosen or {}).get("context") or {}).get("namespace") or "default"
    if insecure:
        configuration.verify_ssl = False
    if ca_file:
        configuration.ssl_ca_cert = ca_file
    configuration.retries = 0  # one answer, as kubectl: no silent urllib3 retries
    server = configuration.host.rstrip("/")
    if urlsplit(server).scheme not in ("http", "https"):
        raise ClusterError(f"error: kubeconfig {kubeconfig}: server {server!r} is not an "
                           "http(s) URL")
    return Cluster(server, ns, _ssl_context(configuration, server), configuration)


def _ssl_context(configuration: Any, server: str) -> ssl.SSLContext | None:
    if urlsplit(server).scheme != "https":
        return None
    ctx = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    ca_data = getattr(configuration, "ca_cert_data", None)
    if ca_data:
        ctx.load_verify_locations(cadata=ca_data)
    if not configuration.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        ctx.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    ctx.set_alpn_protocols(["http/1.1"])  # the upgrade is HTTP/1.1 only
    return ctx


# the kinds kubectl can forward to: resource (plural) -> (short name, singular, API
# group, the Go type its errors print)
KINDS = {
    "pods": ("po", "pod", "", "*v1.Pod"),
    "services": ("svc", "service", "", "*v1.Service"),
    "deployments": ("deploy", "deployment", "apps", "*v1.Deployment"),
    "replicasets": ("rs", "replicaset", "apps", "*v1.ReplicaSet"),
    "statefulsets": ("sts", "statefulset", "apps", "*v1.StatefulSet"),
    "daemonsets": ("ds", "daemonset", "apps", "*v1.DaemonSet"),
    "replicationcontrollers": ("rc", "replicationcontroller", "", "*v1.ReplicationController"),
    "jobs": ("", "job", "batch", "*v1.Job"),  # no short name
}
# the kubernetes client's GET per resource: (API class, method)
_READ = {"pods": ("CoreV1Api", "read_namespaced_pod"),
         "services": ("CoreV1Api", "read_namespaced_service"),
         "replicationcontrollers": ("CoreV1Api", "read_namespaced_replication_controller"),
         "deployments": ("AppsV1Api", "read_namespaced_deployment"),
         "replicasets": ("AppsV1Api", "read_namespaced_replica_set"),
         "statefulsets": ("AppsV1Api", "read_namespaced_stateful_set"),
         "daemonsets": ("AppsV1Api", "read_namespaced_daemon_set"),
         "jobs": ("BatchV1Api", "read_namespaced_job")}


def _resource_named(kind: str) -> str | None:
    """The resource a TYPE names as kubectl's RESTMapper finds it: a short name as is
    (`svc`, not `SVC`), the singular or plural name in any case (`Service`), each
    optionally qualified by its group or version and group (`deploy.apps`,
    `deployments.v1.apps`, `svc.v1.`)."""
    name, _, qualifier = kind.partition(".")
    for resource, (short, singular, group, _) in KINDS.items():
        if qualifier not in ("", group, f"v1.{group}"):
            continue
        if (short and name == short) or name.lower() in (singular, resource):
            return resource
    return None


def target_of(target: str) -> tuple[str, str]:
    """kubectl's forms, as (resource, NAME): `pod/NAME` or a bare `NAME` ("pods");
    `svc/NAME` ("services"); `deploy/NAME`, `rs/`, `sts/`, `ds/`, `rc/`, `job/` and the
    names _resource_named takes."""
    kind, sep, name = target.partition("/")
    if not sep:
        return "pods", target
    if not kind or not name:
        raise ClusterError("error: arguments in resource/name form must have a single "
                           "resource and name")  # kubectl's lines
    if "/" in name:
        raise ClusterError("error: arguments in resource/name form may not have more "
                           "than one slash")
    resource = _resource_named(kind)
    if resource is None:
        raise ClusterError(f"error: {target!r}: not a kind port-forward can reach (pod/NAME "
                           "or NAME, svc/, deploy/, rs/, sts/, ds/, rc/ or job/NAME)")
    return resource, name


def _api(cluster: Cluster, api_class: str, limit: int, timeout: float) -> Any:
    from kubernetes import client

    api_client = client.ApiClient(cluster.configuration)
    rest: Any = api_client.rest_client  # its pool is wrapped: typed as a PoolManager
    rest.pool_manager = _BoundedAnswers(rest.pool_manager, limit, timeout)
    return getattr(client, api_class)(api_client)


def _get(cluster: Cluster, what: str, call: tuple[str, str], max_bytes: int,
         timeout: float, **kwargs: Any) -> dict[str, Any]:
    """One GET through the kubernetes client's `call` (API class, method), its JSON
    answer; every failure is kubectl's line."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = _api(cluster, call[0], max_bytes, timeout)
    try:
        response: Any = getattr(api, call[1])(_preload_content=False,
                                              _request_timeout=timeout, **kwargs)
        answer = json.loads(response.data)
    except ApiException as e:
        raise ClusterError(_server_error(e)) from None
    except HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ClusterError(f"error: unable to connect to the server {cluster.server}: "
                           f"{reason}") from None
    except (ValueError, RecursionError) as e:  # nested past the parser's stack
        raise ClusterError(f"error: the server's answer for {what} is not JSON: {e}"
                           ) from None
    if not isinstance(answer, dict):
        raise ClusterError(f"error: the server's answer for {what} is not an object")
    return answer


def fetch(cluster: Cluster, resource: str, name: str, timeout: float) -> dict[str, Any]:
    """GET the object a target names (a pod, a service, a workload), as kubectl does
    before forwarding: it must exist."""
    return _get(cluster, f"{resource} {name!r}", _READ[resource], MAX_POD_ANSWER, timeout,
                name=name, namespace=cluster.namespace)


def selector_of(resource: str, obj: dict[str, Any]) -> str:
    """kubectl's SelectorsForObject, printed as the pod LIST's labelSelector: a service's
    or replication controller's spec.selector map (labels.SelectorFromSet: keys sorted),
    a workload's LabelSelector (matchLabels and matchExpressions, one requirement each,
    sorted by key). A service without a selector, or an invalid LabelSelector, is
    kubectl's error; no selector elsewhere selects every pod, as kubectl's."""
    go_type = KINDS[resource][3]
    selector = _field(obj, "spec").get("selector")

    def labels_of(value: object) -> dict[str, str]:
        labels = value if isinstance(value, dict) else {}
        for key, text in labels.items():
            if not isinstance(text, str):  # kubectl cannot decode the object at all
                raise ClusterError(f"error: {go_type}: selector label {key!r}: {text!r} is "
                                   "not a string")
        return labels

    if resource in ("services", "replicationcontrollers"):
        labels = labels_of(selector)
        if resource == "services" and not labels:
            name = _field(obj, "metadata").get("name", "")
            raise ClusterError(f"error: cannot attach to {go_type}: invalid service "
                               f"'{name}': Service is defined without a selector")
        return ",".join(f"{key}={labels[key]}" for key in sorted(labels))
    if not isinstance(selector, dict):
        return ""
    requirements = [(str(key), f"{key}={value}")
                    for key, value in labels_of(selector.get("matchLabels")).items()]
    for expression in _items(selector.get("matchExpressions")):
        key, operator = expression.get("key"), expression.get("operator")
        if not isinstance(key, str) or not key:
            raise ClusterError(f"error: cannot attach to {go_type}: invalid label selector: "
                               "a matchExpressions entry has no key")
        values = expression.get("values")
        values = [str(v) for v in values] if isinstance(values, list) else []
        if operator in ("In", "NotIn"):
            if not values:
                raise ClusterError(f"error: cannot attach to {go_type}: invalid label "
                                   "selector: values: Invalid value: []string(nil): for "
                                   "'in', 'notin' operators, values set can't be empty")
            word = "in" if operator == "In" else "notin"
            requirements.append((key, f"{key} {word} ({','.join(sorted(values))})"))
        elif operator in ("Exists", "DoesNotExist"):
            if values:
                quoted = ", ".join(json.dumps(v, ensure_ascii=False) for v in values)
                raise ClusterError(f"error: cannot attach to {go_type}: invalid label "
                                   f"selector: values: Invalid value: []string{{{quoted}}}: "
                                   "values set must be empty for exists and does not exist")
            requirements.append((key, key if operator == "Exists" else f"!{key}"))
        else:
            raise ClusterError(f"error: cannot attach to {go_type}: invalid label selector: "
                               f"{json.dumps(str(operator))} is not a valid label selector "
                               "operator")
    return ",".join(text for _, text in sorted(requirements, key=lambda r: r[0]))


def first_pod(cluster: Cluster, selector: str, timeout: float, running_timeout: float,
              poll: float = 1.0) -> dict[str, Any]:
    """kubectl's GetFirstPod: the most active of the pods the selector matches (assigned,
    Running, ready longest, fewest restarts, oldest: podutils.ActivePods, reversed);
    while none matches, asked again every `poll` seconds (kubectl watches) until
    `running_timeout`, then kubectl's error."""
    deadline = time.monotonic() + running_timeout
    while True:
        pod = _most_active(cluster, selector, timeout)
        if pod is not None:
            return pod
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClusterError("error: timed out waiting for the condition")
        time.sleep(min(poll, left))


# the pods are listed a page at a time (limit and continue, as the API server offers),
# and only the best so far is kept: memory is one page's, however many pods match (an
# answer of 64 MiB of `{}` items took 1.7 GB parsed); a page past MAX_LIST_ANSWER (500
# pods of 17 KB) is asked for again with fewer pods
LIST_PAGE = 500
MIN_LIST_PAGE = 4  # an object is at most 1.5 MiB (etcd's limit): four always fit
MAX_LIST_PAGES = 400
MAX_LIST_ANSWER = 8 << 20


def _most_active(cluster: Cluster, selector: str, timeout: float) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    best_key: tuple[Any, ...] = ()
    token = ""
    limit = LIST_PAGE
    for _ in range(MAX_LIST_PAGES):
        page = {"limit": limit, **({"_continue": token} if token else {})}
        try:
            answer = _get(cluster, f"pods matching {selector!r}",
                          ("CoreV1Api", "list_namespaced_pod"), MAX_LIST_ANSWER, timeout,
                          namespace=cluster.namespace, label_selector=selector, **page)
        except AnswerTooLarge:
            if limit <= MIN_LIST_PAGE:
                raise
            limit = max(MIN_LIST_PAGE, limit // 8)  # large pods: that page again, smaller
            continue
        for pod in _items(answer.get("items")):
            name = _field(pod, "metadata").get("name")
            if not (isinstance(name, str) and name):  # its portforward URL names it
                continue
            key = _less_active(pod)
            if best is None or key < best_key:  # ties: the first listed
                best, best_key = pod, key
        token = _field(answer, "metadata").get("continue") or ""
        if not isinstance(token, str) or not token:
            return best
    raise ClusterError(f"error: the list of pods matching {selector!r} goes on past "
                       f"{MAX_LIST_PAGES} pages")


_PHASE_RANK = {"Running": 2, "Unknown": 1}  # Pending, Succeeded, Failed: 0, as ActivePods


def _less_active(pod: dict[str, Any]) -> tuple[Any, ...]:
    """A sort key that puts the pod ActivePods ranks highest first (restarts are the
    containers' own: kubectl 1.27-1.33 count no init container's, a sidecar's neither)."""
    spec, status = _field(pod, "spec"), _field(pod, "status")
    ready = next((c for c in _items(status.get("conditions"))
                  if c.get("type") == "Ready"), {})
    is_ready = ready.get("status") == "True"
    restarts = max((n for n in (c.get("restartCount")
                                for c in _items(status.get("containerStatuses")))
                    if type(n) is int), default=0)
    return (not spec.get("nodeName"), -_PHASE_RANK.get(str(status.get("phase")), 0),
            not is_ready, _time_or_last(ready.get("lastTransitionTime")) if is_ready else 0,
            restarts, _time_or_last(_field(pod, "metadata").get("creationTimestamp")))


_ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)  # Go's time.Time{}


def _time_or_last(stamp: object) -> float:
    """An RFC 3339 time as seconds; missing, unreadable or Go's zero time: after every
    other (a zero time is the newest, in ActivePods' afterOrZero)."""
    if isinstance(stamp, str):
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if when != _ZERO_TIME:
                return when.timestamp()
        except (ValueError, OverflowError):
            pass
    return math.inf


def _number(value: object) -> int | None:
    """A port number as the API server's JSON has one: an integer (true is not 1)."""
    return value if type(value) is int else None


def _protocol_of(port: dict[str, Any]) -> str:
    return str(port.get("protocol") or "TCP").lower()


def _udp_only(ports: list[dict[str, Any]], key: str) -> set[int]:
    """The numbers (under `key`) declared as UDP and never as TCP: kubectl's checkUDPPorts
    refuses a TCP spec for them."""
    def numbers(protocol: str) -> set[int]:
        return {n for n in (_number(port.get(key)) for port in ports
                            if _protocol_of(port) == protocol) if n is not None}
    return numbers("udp") - numbers("tcp")


def _named(ports: list[dict[str, Any]], name: str, protocol: str | None, key: str) -> object:
    """The `key` of the first port named `name` (of that protocol, if given), else None."""
    return next((port.get(key) for port in ports if port.get("name") == name
                 and protocol in (None, _protocol_of(port))), None)


def _with_protocol(protocol: str | None) -> str:
    return f" with protocol {protocol.upper()}" if protocol else ""


def _container_ports(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [port for container in _items(_field(pod, "spec").get("containers"))
            for port in _items(container.get("ports"))]


def _container_port_named(pod: dict[str, Any], name: str, protocol: str | None = None
                          ) -> int:
    """kubectl's LookupContainerPortNumberByName: the first container port of that name
    (of that protocol, with crishim's suffix), 1..65535."""
    pod_name = _field(pod, "metadata").get("name", "")
    value = _named(_container_ports(pod), name, protocol, "containerPort")
    if value is None:
        raise ClusterError(f"error: Pod '{pod_name}' does not have a named port "
                           f"'{name}'{_with_protocol(protocol)}")
    number = _number(value)
    if number is None or not 1 <= number <= 65535:
        raise ClusterError(f"error: Pod '{pod_name}' has named port '{name}' with "
                           f"containerPort {value!r}, not 1..65535")
    return number


def resolve_named_ports(texts: list[str], specs: list[PortSpec], pod: dict[str, Any]
                        ) -> list[PortSpec]:
    """The specs (parsed from `texts`) with each named remote port replaced by the number
    of the first container port of that name in the pod's spec.containers, as kubectl's
    convertPodNamedPortToNumber (a `/tcp` or `/udp` suffix, crishim's, also asks for that
    protocol). As kubectl's checkUDPPortInPod, a TCP spec, named or not, whose number the
    pod declares only as UDP is refused. A name no container port has is kubectl's error;
    the first failing spec in order is the one reported, as kubectl."""
    udp_only = _udp_only(_container_ports(pod), "containerPort")
    resolved = []
    for text, spec in zip(texts, specs):
        named = spec.named
        if named is not None:
            number = _container_port_named(pod, named.name, named.protocol)
            spec = PortSpec(number if named.local_is_remote else spec.local, number,
                            spec.protocol)
        if spec.protocol == "tcp" and spec.remote in udp_only:
            raise ClusterError("error: UDP protocol is not supported for "
                               f"{_remote_as_given(text)}")
        resolved.append(spec)
    return resolved


def _remote_as_given(text: str) -> str:
    """The remote port of a spec as its text has it (kubectl's splitPort), for messages."""
    ports_text = text.removesuffix("/tcp")
    return ports_text.rpartition(":")[2]


def resolve_service_ports(texts: list[str], specs: list[PortSpec], service: dict[str, Any],
                          pod: dict[str, Any]) -> list[PortSpec]:
    """kubectl's checkUDPPortInService, then translateServicePortToTargetPort: each spec's
    remote port is a service port (a number, or a service port's name), and forwards to
    that port's targetPort in `pod` (a number, the port itself when unset, or a container
    port's name). A local port given as the same name is the service port's number, as
    kubectl. A spec ending in `/udp` (crishim's) uses the service's UDP port of that
    number or name; a `/tcp` suffix asks for the TCP one."""
    svc_name = str(_field(service, "metadata").get("name") or "")
    spec_field = _field(service, "spec")
    ports = _items(spec_field.get("ports"))
    headless = spec_field.get("clusterIP") == "None"
    # kubectl's lookups ignore protocol; crishim's suffix asks for one
    protocols = [spec.protocol if spec.protocol_given else None for spec in specs]

    def service_port(spec: PortSpec, protocol: str | None) -> int:
        if spec.named is None:
            return spec.remote
        return _service_port_named(service, spec.named.name, protocol)

    udp_only = _udp_only(ports, "port")
    for text, spec, protocol in zip(texts, specs, protocols):  # checkUDPPortInService
        if spec.protocol == "tcp" and service_port(spec, protocol) in udp_only:
            raise ClusterError("error: UDP protocol is not supported for "
                               f"{_remote_as_given(text)}")
    resolved = []
    for spec, protocol in zip(specs, protocols):  # translateServicePortToTargetPort
        number = service_port(spec, protocol)
        local = number if spec.named and spec.named.local_is_remote else spec.local
        value = _service_port(service, number, protocol).get("targetPort")
        if headless or value is None or value == "" or _number(value) == 0:
            target: int | None = number  # unset: the API server's default
        elif isinstance(value, str):
            target = _container_port_named(pod, value)
        else:
            target = _number(value)
        if target is None or not 1 <= target <= 65535:
            raise ClusterError(f"error: Service {svc_name} port {number} has targetPort "
                               f"{value!r}, not 1..65535")
        resolved.append(PortSpec(local, target, spec.protocol))
    return resolved


def _service_port_named(service: dict[str, Any], name: str, protocol: str | None = None
                        ) -> int:
    """kubectl's LookupServicePortNumberByName: the number of the first service port of
    that name (of that protocol, with crishim's suffix)."""
    number = _number(_named(_items(_field(service, "spec").get("ports")), name, protocol,
                            "port"))
    if number is None:
        svc_name = str(_field(service, "metadata").get("name") or "")
        raise ClusterError(f"error: Service '{svc_name}' does not have a named port "
                           f"'{name}'{_with_protocol(protocol)}")
    return number


def _service_port(service: dict[str, Any], number: int, protocol: str | None = None
                  ) -> dict[str, Any]:
    """The service's port `number` (of that protocol, with crishim's suffix), as
    kubectl's LookupContainerPortNumberByServicePort finds it."""
    port = next((port for port in _items(_field(service, "spec").get("ports"))
                 if _number(port.get("port")) == number
                 and protocol in (None, _protocol_of(port))), None)
    if port is None:
        svc_name = str(_field(service, "metadata").get("name") or "")
        on = f" {protocol.upper()}" if protocol else ""
        raise ClusterError(f"error: Service {svc_name} does not have a service port "
                           f"{number}{on}")
    return port


# --------------------------------------------------------------- a spec crishim refused
# In the cluster path kubectl reads port specs only after the object's GET and the pod's
# pick: its name translation first (checkUDPPorts, convertPodNamedPortToNumber,
# translateServicePortToTargetPort), the Running check, then portforward's parsePorts. A
# spec crishim's grammar refuses is reported at that point, in kubectl's words where
# kubectl's grammar has them (specs with no crishim `/tcp` `/udp` suffix).


def _go_atoi(text: str) -> int | None:
    """Go's strconv.Atoi: an optional sign and decimal digits within int64, else None."""
    sign, digits = (text[0], text[1:]) if text[:1] in ("+", "-") else ("", text)
    if not (digits.isascii() and digits.isdigit()) or len(digits.lstrip("0")) > 19:
        return None
    value = int(sign + digits)
    return value if -(1 << 63) <= value < (1 << 63) else None


def _go_quote(text: str) -> str:
    """Go's strconv.Quote, for the printable text a port spec is."""
    inner = "".join("\\" + c if c in '"\\' else c if c.isprintable() else
                    (f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}"
                     if ord(c) < 0x10000 else f"\\U{ord(c):08x}") for c in text)
    return f'"{inner}"'


def _go_parse_uint16(text: str) -> str | None:
    """Why Go's strconv.ParseUint(text, 10, 16) refuses text, in its words, or None."""
    n = 0
    for c in text:
        if not "0" <= c <= "9":
            return f"strconv.ParseUint: parsing {_go_quote(text)}: invalid syntax"
        n = n * 10 + ord(c) - 48
        if n > 65535:
            return f"strconv.ParseUint: parsing {_go_quote(text)}: value out of range"
    return None if text else f"strconv.ParseUint: parsing {_go_quote(text)}: invalid syntax"


def _kubectl_split(text: str) -> tuple[str, str] | None:
    """kubectl's splitPort; None where it splits into more than two parts (kubectl then
    forwards the first part to itself, which crishim does not copy)."""
    parts = text.split(":")
    if len(parts) > 2:
        return None
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], parts[0])


def translation_error(text: str, resource: str, obj: dict[str, Any],
                      pod: dict[str, Any]) -> ClusterError | None:
    """kubectl's error for `text` (a spec crishim refused) at its name translation, where
    it has one: a remote port that is not Atoi's number is a port name the pod (or the
    service) must have, a TCP port the pod or service declares only as UDP is refused,
    and a service's port must be one of its ports."""
    split = _kubectl_split(text)
    if split is None or "/" in text:
        return None
    remote = split[1]
    service = resource == "services"
    ports = _items(_field(obj, "spec").get("ports")) if service else _container_ports(pod)
    number = _go_atoi(remote)
    if number is None:
        try:
            number = (_service_port_named(obj, remote) if service
                      else _container_port_named(pod, remote))
        except ClusterError as e:
            return e
    if number in _udp_only(ports, "port" if service else "containerPort"):
        return ClusterError(f"error: UDP protocol is not supported for {remote}")
    if service:
        try:
            _service_port(obj, number)
        except ClusterError as e:
            return e
    return None


def parse_error(text: str, resource: str, obj: dict[str, Any], pod: dict[str, Any]
                ) -> ClusterError | None:
    """kubectl's error for `text` (a spec crishim refused, translated without an error)
    at portforward's parsePorts, where it has one."""
    split = _kubectl_split(text)
    if split is None or "/" in text:
        return None
    local, remote = split
    if _go_atoi(remote) is None:  # a name translation found: its number
        remote = str(_service_port_named(obj, remote) if resource == "services"
                     else _container_port_named(pod, remote))
        if split[0] == split[1]:
            local = remote
    if resource == "services":  # the service port's target, a number by now
        remote = "1"  # what parsePorts sees is a valid target port
    if local == "" and ":" in text:
        local = "0"  # `:5000`
    for what, value in (("local", local), ("remote", remote)):
        why = _go_parse_uint16(value)
        if why:
            return ClusterError(f"error: error parsing {what} port '{value}': {why}")
    if int(remote) == 0:
        return ClusterError("error: remote port must be > 0")
    return None


def check_running(pod: dict[str, Any]) -> None:
    """kubectl forwards only to a Running pod."""
    phase = _field(pod, "status").get("phase", "")
    if phase != "Running":
        raise ClusterError("error: unable to forward port because pod is not running. "
                           f"Current status={phase}")


def _field(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _items(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) \
        else []


# a Pod object is a few KiB; kubectl's own GET has no bound, an answer past this is not one
MAX_POD_ANSWER = 4 << 20
MAX_ERROR_TEXT = 500  # of an error answer that is not a Status, shown

_ANSWER_READ = 64 * 1024


class _Answer:
    """An answer read whole, in the shape the kubernetes client reads a urllib3 one."""

    def __init__(self, response: Any, data: bytes) -> None:
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.data = data

    def getheaders(self) -> Any:
        return self.headers

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name, default)


class _BoundedAnswers:
    """The kubernetes client's urllib3 pool, its answers read whole here: at most `limit`
    bytes and within `timeout` seconds of the request, where the client would read any
    body whole with only each socket read timed (an endless body grew the process by
    ~220 MiB/s, one byte every 2 s held it forever)."""

    def __init__(self, pool: Any, limit: int, timeout: float) -> None:
        self.pool = pool
        self.limit = limit
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> _Answer:
        deadline = time.monotonic() + self.timeout
        kwargs["preload_content"] = False
        response = self.pool.request(*args, **kwargs)
        body = bytearray()
        try:
            while chunk := response.read1(_ANSWER_READ):
                body += chunk
                if len(body) > self.limit:
                    raise AnswerTooLarge(f"error: the server's answer is larger than "
                                         f"{self.limit >> 20} MiB")
                if time.monotonic() > deadline:
                    raise ClusterError(f"error: the server's answer took longer than "
                                       f"{self.timeout:g}s")
        except BaseException:
            response.close()  # the rest of the answer is never read: not reused
            raise
        response.release_conn()
        return _Answer(response, bytes(body))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def _server_error(e: Any) -> str:
    """kubectl's wording for an API error answer."""
    if e.status == 401:
        return "error: You must be logged in to the server (Unauthorized)"
    try:
        status = json.loads(e.body or b"")
    except (ValueError, RecursionError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    message = status.get("message")
    if not isinstance(message, str) or not message:  # not a Status: the body, one line
        body = e.body.decode("utf-8", "replace") if isinstance(e.body, bytes) \
            else str(e.body or "")
        message = " ".join(body.split())
        if len(message) > MAX_ERROR_TEXT:
            message = message[:MAX_ERROR_TEXT] + "…"
    reason = status.get("reason")
    if not isinstance(reason, str) or not reason:
        reason = e.reason or str(e.status)
    return f"Error from server ({reason}): {message or 'no message'}"


class ClusterForward:
    """Opens sessions to one pod through its pods/portforward subresource."""

    def __init__(self, cluster: Cluster, pod: str, transport: str = "auto",
                 timeout: float = 10.0) -> None:
        self.check_transport(transport)
        self.cluster = cluster
        self.pod = pod
        self.transport = transport
        self.timeout = timeout
        self.url = (f"{cluster.server}/api/v1/namespaces/{quote(cluster.namespace, safe='')}"
                    f"/pods/{quote(pod, safe='')}/portforward")
        self.chosen: str | None = None  # the transport that worked, once one has

    @staticmethod
    def check_transport(transport: str) -> None:
        if transport not in CLUSTER_TRANSPORTS:
            raise ClusterError(f"error: transport {transport!r} is not offered by an API "
                               f"server; choose from {', '.join(CLUSTER_TRANSPORTS)}")

    async def open(self, transport: str, ports: list[int], ping_interval: float
                   ) -> ClientSession:
        """A SessionOpener: `transport` is the forwarder's request, "auto" or one of ours."""
        wanted = self.chosen or (transport if transport != "auto" else self.transport)
        if wanted != "auto":
            return await self._open(wanted, ping_interval)
        try:
            session = await self._open("spdy-over-websocket", ping_interval)
        except UpgradeRefused as e:
            if e.status == 101:  # upgraded, but wrongly: an error, not an old server
                raise
            session = await self._open("spdy", ping_interval)
            self.chosen = "spdy"
            return session
        self.chosen = "spdy-over-websocket"
        return session

    async def _open(self, transport: str, ping_interval: float) -> ClientSession:
        return await open_session(self.url, transport, ssl_context=self.cluster.ssl_context,
                                  ping_interval=ping_interval, timeout=self.timeout,
                                  headers=self.cluster.auth_headers())
