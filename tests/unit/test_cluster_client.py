"""The cluster path's pure parts: pod targets and the kubeconfig loader's credentials."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from crishim.client.cluster import (
    ClusterError,
    _less_active,
    _server_error,
    load_cluster,
    resolve_named_ports,
    resolve_service_ports,
    selector_of,
    target_of,
)
from crishim.client.portforward import PortSpec, parse_port_spec


@pytest.mark.parametrize("target", ["web", "pod/web", "pods/web", "po/web"])
def test_pod_targets_as_kubectl(target: str) -> None:
    assert target_of(target) == ("pods", "web")


@pytest.mark.parametrize("target, resource", [
    ("svc/web", "services"), ("service/web", "services"), ("services/web", "services"),
    ("Service/web", "services"), ("SERVICE/web", "services"), ("svc.v1./web", "services"),
    ("Pod/web", "pods"), ("deploy/web", "deployments"), ("Deployment/web", "deployments"),
    ("deployments.apps/web", "deployments"), ("deployments.v1.apps/web", "deployments"),
    ("deploy.apps/web", "deployments"), ("rs/web", "replicasets"),
    ("replicaSet/web", "replicasets"), ("statefulset/web", "statefulsets"),
    ("ds/web", "daemonsets"), ("rc/web", "replicationcontrollers"),
    ("job/web", "jobs"), ("Job/web", "jobs"), ("jobs.batch/web", "jobs"),
    ("job.v1.batch/web", "jobs"),
])
def test_other_targets_as_kubectl(target: str, resource: str) -> None:
    """As kubectl 1.33's RESTMapper takes them against the stand-in's discovery."""
    assert target_of(target) == (resource, "web")


@pytest.mark.parametrize("target, message", [
    ("cm/web", "not a kind port-forward can reach"),
    ("SVC/web", "not a kind port-forward can reach"),  # short names are exact
    ("PO/web", "not a kind port-forward can reach"),
    ("svc.apps/web", "not a kind port-forward can reach"),
    ("deploy.v2.apps/web", "not a kind port-forward can reach"),
    ("cronjob/web", "not a kind port-forward can reach"),
    ("job.apps/web", "not a kind port-forward can reach"),
    (".batch/web", "not a kind port-forward can reach"),  # jobs have no short name
    ("svc/", "must have a single resource and name"),
    ("/web", "must have a single resource and name"),
    ("pod/a/b", "may not have more than one slash"),
])
def test_other_targets_are_refused(target: str, message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        target_of(target)


def _kubeconfig(tmp_path: Path, user: dict[str, Any],
                context: dict[str, Any] | None = None) -> str:
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u",
                                               **(context or {})}}],
    }))
    return str(path)


def test_bearer_token_and_context_namespace(tmp_path: Path) -> None:
    cluster = load_cluster(_kubeconfig(tmp_path, {"token": "t0k"}, {"namespace": "ns1"}))
    assert cluster.auth_headers() == [("Authorization", "Bearer t0k")]
    assert cluster.namespace == "ns1"
    assert cluster.server == "https://127.0.0.1:6443"
    assert cluster.ssl_context is not None and not cluster.ssl_context.check_hostname


def test_a_context_the_kubeconfig_lacks_is_kubectls_error(tmp_path: Path) -> None:
    """kubectl's line (the loader's own was about an object "in .../contexts list")."""
    config = _kubeconfig(tmp_path, {"token": "t0k"})
    with pytest.raises(ClusterError) as e:
        load_cluster(config, context="nope")
    assert str(e.value) == ("Error in configuration: context was not found for specified "
                            "context: nope")
    assert load_cluster(config, context="c").namespace == "default"


def test_context_is_found_without_a_current_context(tmp_path: Path) -> None:
    """kubectl needs no current-context when --context names one (the loader's list of
    contexts did, and said `Expected key current-context`)."""
    config = _kubeconfig(tmp_path, {"token": "t0k"}, {"namespace": "ns2"})
    document = json.loads(Path(config).read_text())
    del document["current-context"]
    Path(config).write_text(json.dumps(document))
    assert load_cluster(config, context="c").namespace == "ns2"
    with pytest.raises(ClusterError) as e:
        load_cluster(config, context="nope")
    assert str(e.value) == ("Error in configuration: context was not found for specified "
                            "context: nope")


def test_namespace_flag_wins_and_basic_auth(tmp_path: Path) -> None:
    cluster = load_cluster(_kubeconfig(tmp_path, {"username": "a", "password": "b"}),
                           namespace="other")
    assert cluster.namespace == "other"
    assert cluster.auth_headers() == [("Authorization", "Basic YTpi")]


def test_unreadable_kubeconfig_names_the_file(tmp_path: Path) -> None:
    """A missing file was the loader's "Invalid kube-config file. No configuration found"."""
    with pytest.raises(ClusterError, match="kubeconfig .*missing: no such file"):
        load_cluster(str(tmp_path / "missing"))


def test_without_the_kubernetes_package_kubeconfig_is_one_clear_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubernetes is the `cluster` extra, not a dependency: without it --kubeconfig was a
    ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # import kubernetes: ImportError
    with pytest.raises(ClusterError, match=r"pip install 'crishim\[cluster\]'"):
        load_cluster(_kubeconfig(tmp_path, {"token": "t"}))


@pytest.mark.parametrize("content, words", [
    (b"clusters: [\n", "not a YAML file"),                    # a YAML syntax error
    (b"apiVersion: v1\nclusters: 5\ncontexts: 5\n", "kubeconfig"),  # YAML, not a kubeconfig
    (b"\xff\xfe\x00garbage", "kubeconfig"),                  # not UTF-8
])
def test_a_kubeconfig_that_is_not_one_is_a_cluster_error(tmp_path: Path, content: bytes,
                                                          words: str) -> None:
    """A YAML error, another shape or another encoding raised ScannerError, TypeError or
    UnicodeDecodeError out of the loader: a traceback from port-forward."""
    path = tmp_path / "config"
    path.write_bytes(content)
    with pytest.raises(ClusterError) as e:
        load_cluster(str(path))
    assert str(e.value).startswith(f"error: kubeconfig {path}: ") and words in str(e.value)
    assert len(str(e.value)) < 400


def _pod(*containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "web"},
            "spec": {"containers": [{"name": f"c{i}", "ports": ports}
                                    for i, ports in enumerate(containers)]}}


# as the API server answers: an unnamed port has no name key
POD = _pod([{"containerPort": 7000, "protocol": "TCP"},
            {"name": "http", "containerPort": 80, "protocol": "TCP"},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}],
           [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "dns", "containerPort": 5353, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090}])


@pytest.mark.parametrize("text, resolved", [
    ("8080:http", PortSpec(8080, 80)),  # the first of that name, over all containers
    ("http", PortSpec(80, 80)),  # name alone: the local port is the number too
    ("http:http", PortSpec(80, 80)),  # kubectl's rule: the same text both sides
    (":http", PortSpec(0, 80)),
    ("dns/udp", PortSpec(53, 53, "udp")),  # /udp: the first UDP one of that name
    ("dns/tcp", PortSpec(5353, 5353)),  # the first TCP one of that name
    ("9:metrics/tcp", PortSpec(9, 9090)),  # no protocol field: TCP, the API's default
    ("7000", PortSpec(7000, 7000)),  # numbers stay as they are
    ("53/udp", PortSpec(53, 53, "udp")),  # crishim's UDP: what kubectl refuses as TCP
])
def test_named_ports_resolve_as_kubectl(text: str, resolved: PortSpec) -> None:
    assert resolve_named_ports([text], [parse_port_spec(text, names=True)], POD) == [resolved]


@pytest.mark.parametrize("text, message", [
    ("nope", "error: Pod 'web' does not have a named port 'nope'"),
    ("8080:HTTP", "error: Pod 'web' does not have a named port 'HTTP'"),  # exact names
    ("http/udp", "error: Pod 'web' does not have a named port 'http' with protocol UDP"),
    ("nope/tcp", "error: Pod 'web' does not have a named port 'nope' with protocol TCP"),
    # kubectl's checkUDPPortInPod: the first of that name (any protocol) is UDP only
    ("dns", "error: UDP protocol is not supported for dns"),
    ("5:dns", "error: UDP protocol is not supported for dns"),
    ("053", "error: UDP protocol is not supported for 053"),  # numbers too, as given
    ("1:53/tcp", "error: UDP protocol is not supported for 53"),
])
def test_a_name_no_container_port_has_is_kubectls_error(text: str, message: str) -> None:
    with pytest.raises(ClusterError) as e:
        resolve_named_ports([text], [parse_port_spec(text, names=True)], POD)
    assert str(e.value) == message


@pytest.mark.parametrize("pod", [{}, {"spec": None}, {"spec": {"containers": 5}},
                                 _pod([{"name": "http"}]), _pod(["http"])])
def test_a_pod_without_usable_ports_names_none(pod: dict[str, Any]) -> None:
    with pytest.raises(ClusterError, match="does not have a named port 'http'"):
        resolve_named_ports(["http"], [parse_port_spec("http", names=True)], pod)


def test_a_container_port_out_of_range_is_refused() -> None:
    with pytest.raises(ClusterError, match="containerPort 0, not 1..65535"):
        resolve_named_ports(["http"], [parse_port_spec("http", names=True)],
                            _pod([{"name": "http", "containerPort": 0}]))


@pytest.mark.parametrize("texts, message", [
    (["dns", "nope"], "UDP protocol is not supported for dns"),
    (["nope", "dns"], "does not have a named port 'nope'"),
])
def test_the_first_failing_spec_is_reported_as_kubectl(texts: list[str], message: str
                                                       ) -> None:
    with pytest.raises(ClusterError, match=message):
        resolve_named_ports(texts, [parse_port_spec(t, names=True) for t in texts], POD)


def _listed_pod(name: str, phase: str = "Running", node: str = "n1", ready: str | None = None,
                restarts: int = 0, created: str = "2025-01-01T00:00:00Z",
                init_restarts: int = 0, sidecar: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True", "lastTransitionTime": ready}] \
        if ready else [{"type": "Ready", "status": "False"}]
    init = {"name": "init", **({"restartPolicy": "Always"} if sidecar else {})}
    return {"metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node, "initContainers": [init], "containers": [{"ports": [
                {"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"restartCount": restarts}],
                       "initContainerStatuses": [{"name": "init",
                                                  "restartCount": init_restarts}]}}


@pytest.mark.parametrize("pods, first", [
    # assigned before unassigned; Running before Unknown before Pending
    ([_listed_pod("a", node=""), _listed_pod("b")], "b"),
    ([_listed_pod("a", "Pending"), _listed_pod("b", "Unknown"), _listed_pod("c")], "c"),
    ([_listed_pod("a", "Pending"), _listed_pod("b", "Unknown")], "b"),
    ([_listed_pod("a", "Succeeded"), _listed_pod("b", "Unknown")], "b"),
    # ready before not ready; ready longest first
    ([_listed_pod("a"), _listed_pod("b", ready="2025-01-02T00:00:00Z")], "b"),
    ([_listed_pod("a", ready="2025-01-03T00:00:00Z"),
      _listed_pod("b", ready="2025-01-02T00:00:00Z")], "b"),
    # fewer restarts; then the oldest
    ([_listed_pod("a", restarts=3), _listed_pod("b", restarts=1)], "b"),
    ([_listed_pod("a", created="2025-02-01T00:00:00Z"), _listed_pod("b")], "b"),
    ([_listed_pod("a", created=""), _listed_pod("b", created="2025-03-01T00:00:00Z")], "b"),
    # Go's zero time is the newest, not year 1 (afterOrZero)
    ([_listed_pod("a", created="0001-01-01T00:00:00Z"), _listed_pod("b")], "b"),
    ([_listed_pod("a", ready="0001-01-01T00:00:00Z"),
      _listed_pod("b", ready="2025-01-02T00:00:00Z")], "b"),
    # an init container's restarts do not count, a sidecar's neither (kubectl 1.27-1.33)
    ([_listed_pod("a", init_restarts=5, sidecar=True), _listed_pod("b", restarts=1)], "a"),
    ([_listed_pod("a", init_restarts=5), _listed_pod("b", restarts=1)], "a"),
    # a restart count that is not a number counts as none
    ([_listed_pod("a", restarts=True), _listed_pod("b", restarts=1)], "a"),
])
def test_the_most_active_pod_is_chosen_as_kubectl(pods: list[dict[str, Any]],
                                                  first: str) -> None:
    """podutils.ActivePods, reversed, as kubectl's GetFirstPod sorts a service's pods."""
    for order in (pods, pods[::-1]):
        assert min(order, key=_less_active)["metadata"]["name"] == first


def test_a_service_selector_is_printed_with_sorted_keys() -> None:
    service = {"metadata": {"name": "s"}, "spec": {"selector": {"tier": "f", "app": "w"}}}
    assert selector_of("services", service) == "app=w,tier=f"
    with pytest.raises(ClusterError, match="Service is defined without a selector"):
        selector_of("services", {"metadata": {"name": "s"}, "spec": {"selector": {}}})
    # a replication controller without one selects every pod, as kubectl's
    assert selector_of("replicationcontrollers", {"spec": {}}) == ""


@pytest.mark.parametrize("selector, printed", [
    ({"matchLabels": {"b": "2", "a": "1"}}, "a=1,b=2"),
    ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["y", "x", "y"]},
                           {"key": "e", "operator": "Exists"}],
      "matchLabels": {"z": "1"}}, "e,t notin (x,y,y),z=1"),  # as kubectl: not deduplicated
    ({"matchExpressions": [{"key": "c", "operator": "DoesNotExist", "values": []}]}, "!c"),
    ({}, ""), (None, ""),
])
def test_a_label_selector_is_printed_as_kubectl(selector: object, printed: str) -> None:
    assert selector_of("deployments", {"spec": {"selector": selector}}) == printed


@pytest.mark.parametrize("expression, message", [
    ({"key": "t", "operator": "In"}, "[]string(nil): for 'in', 'notin' operators, values "
                                     "set can't be empty"),
    ({"key": "t", "operator": "Exists", "values": ["x"]},
     '[]string{"x"}: values set must be empty for exists and does not exist'),
    ({"key": "t", "operator": "Near"}, '"Near" is not a valid label selector operator'),
    ({"key": "t", "operator": "Exists", "values": ["é"]},
     '[]string{"é"}: values set must be empty for exists and does not exist'),
    ({"operator": "Exists"}, "a matchExpressions entry has no key"),
])
def test_an_invalid_label_selector_is_kubectls_error(expression: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ClusterError) as e:
        selector_of("statefulsets", {"spec": {"selector": {"matchExpressions": [expression]}}})
    assert str(e.value).startswith("error: cannot attach to *v1.StatefulSet: invalid label "
                                   "selector: ")
    assert str(e.value).endswith(message)


SERVICE = {"metadata": {"name": "svc"}, "spec": {"clusterIP": "10.0.0.1", "ports": [
    {"name": "web", "port": 80, "protocol": "TCP", "targetPort": "http"},
    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5354},
    {"name": "bare", "port": 90, "protocol": "TCP"},
    {"name": "big", "port": 91, "protocol": "TCP", "targetPort": 70000},
]}}


@pytest.mark.parametrize("text, resolved", [
    ("80", PortSpec(80, 8080)),
    ("8000:80", PortSpec(8000, 8080)),
    (":80", PortSpec(0, 8080)),
    ("web", PortSpec(80, 8080)),  # kubectl: the local port is the service port
    ("web:web", PortSpec(80, 8080)),
    ("8000:web", PortSpec(8000, 8080)),
    ("90", PortSpec(90, 90)),  # targetPort unset: the service port
    ("53", PortSpec(53, 5353)),  # the first of that number, as kubectl
    ("53/tcp", PortSpec(53, 5354)),
    ("53/udp", PortSpec(53, 5353, "udp")),
    (":dns/udp", PortSpec(0, 5353, "udp")),
])
def test_service_ports_translate_as_kubectl(text: str, resolved: PortSpec) -> None:
    spec = parse_port_spec(text, names=True)
    assert resolve_service_ports([text], [spec], SERVICE, _listed_pod("p")) == [resolved]


@pytest.mark.parametrize("text, message", [
    ("81", "Service svc does not have a service port 81"),
    ("80/udp", "Service svc does not have a service port 80 UDP"),
    ("nope", "Service 'svc' does not have a named port 'nope'"),
    ("web/udp", "Service 'svc' does not have a named port 'web'"),
    ("91", "port 91 has targetPort 70000, not 1..65535"),
])
def test_a_service_port_that_cannot_be_translated_is_an_error(text: str,
                                                             message: str) -> None:
    spec = parse_port_spec(text, names=True)
    with pytest.raises(ClusterError, match=re.escape(message)):
        resolve_service_ports([text], [spec], SERVICE, _listed_pod("p"))


@pytest.mark.parametrize("ports, text, message", [
    # a number that is a list or an object (it raised TypeError: unhashable) or true
    ([{"port": [1], "protocol": "UDP"}, {"port": 80}], "81",
     "Service svc does not have a service port 81"),
    ([{"port": {"a": 1}}, {"port": True}], "1", "Service svc does not have a service port 1"),
    ([{"name": "web", "port": True}], "web", "Service 'svc' does not have a named port 'web'"),
    ([{"port": 80, "targetPort": True}], "80", "port 80 has targetPort True, not 1..65535"),
    ([{"port": 80, "targetPort": [80]}], "80", "port 80 has targetPort [80], not 1..65535"),
    ([{"port": 80, "targetPort": "web"}], "80",
     "Pod 'p' has named port 'web' with containerPort True, not 1..65535"),
])
def test_service_port_values_that_are_not_numbers_are_errors(
        ports: list[dict[str, Any]], text: str, message: str) -> None:
    service = {"metadata": {"name": "svc"}, "spec": {"ports": ports}}
    pod = _listed_pod("p")
    pod["spec"]["containers"][0]["ports"] = [{"name": "web", "containerPort": True},
                                             {"containerPort": [5], "protocol": "UDP"}]
    with pytest.raises(ClusterError, match=re.escape(message)):
        resolve_service_ports([text], [parse_port_spec(text, names=True)], service, pod)


def test_a_pods_container_port_that_is_not_a_number_is_an_error() -> None:
    pod = _pod([{"name": "a", "containerPort": True}, {"containerPort": [1], "protocol": "UDP"},
                {"name": "b", "containerPort": 81}])
    assert resolve_named_ports(["b"], [parse_port_spec("b", names=True)], pod) \
        == [PortSpec(81, 81)]
    with pytest.raises(ClusterError, match="with containerPort True, not 1..65535"):
        resolve_named_ports(["a"], [parse_port_spec("a", names=True)], pod)


@pytest.mark.parametrize("resource, selector", [
    ("services", {"app": 5}), ("replicationcontrollers", {"app": None}),
    ("deployments", {"matchLabels": {"app": ["x"]}}),
])
def test_a_selector_label_that_is_not_a_string_is_an_error(resource: str,
                                                           selector: object) -> None:
    """kubectl cannot decode such an object; crishim listed `app=5` and waited."""
    with pytest.raises(ClusterError, match="is not a string"):
        selector_of(resource, {"metadata": {"name": "x"}, "spec": {"selector": selector}})


class _ApiError:
    def __init__(self, body: bytes) -> None:
        self.status, self.reason, self.body = 404, "Not Found", body


@pytest.mark.parametrize("body, line", [
    (json.dumps({"kind": "Status", "message": 'pods "x" not found', "reason": "NotFound"}
                ).encode(), 'Error from server (NotFound): pods "x" not found'),
    (json.dumps({"message": ["a"], "reason": {"x": 1}}).encode(),
     'Error from server (Not Found): {"message": ["a"], "reason": {"x": 1}}'),
    (b"[" * 100_000, "Error from server (Not Found): " + "[" * 500 + "…"),
    (b"not\n found", "Error from server (Not Found): not found"),
])
def test_an_error_answer_is_one_line_whatever_its_body(body: bytes, line: str) -> None:
    assert _server_error(_ApiError(body)) == line


def test_a_headless_service_forwards_the_port_itself() -> None:
    headless = {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [
        {"port": 80, "protocol": "TCP", "targetPort": "http"}]}}
    assert resolve_service_ports(["80"], [parse_port_spec("80")], headless, _listed_pod("p")) \
        == [PortSpec(80, 80)]


def test_a_pod_list_that_never_ends_is_an_error_after_its_pages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that always answers with another `continue` token: MAX_LIST_PAGES pages,
    then one line (it would otherwise be asked for pages forever)."""
    from crishim.client import cluster as cluster_module

    pages: list[dict[str, Any]] = []

    def endless(*args: Any, **kwargs: Any) -> dict[str, Any]:
        pages.append(kwargs)
        return {"items": [_listed_pod(f"p{len(pages)}", "Pending")],
                "metadata": {"continue": str(len(pages))}}

    monkeypatch.setattr(cluster_module, "_get", endless)
    with pytest.raises(ClusterError, match="goes on past 400 pages"):
        cluster_module.first_pod(cluster_module.Cluster("http://x", "ns", None, None),
                                 "app=x", 1.0, 5.0)
    assert len(pages) == cluster_module.MAX_LIST_PAGES
    assert pages[1]["_continue"] == "1" and pages[0]["limit"] == cluster_module.LIST_PAGE


@pytest.mark.parametrize("text, why", [
    ("80", None), ("65535", None), ("00080", None),
    ("65536", 'strconv.ParseUint: parsing "65536": value out of range'),
    # Go stops at the digit that overflows, before the letter after it
    ("70000x", 'strconv.ParseUint: parsing "70000x": value out of range'),
    ("6553x", 'strconv.ParseUint: parsing "6553x": invalid syntax'),
    ("+80", 'strconv.ParseUint: parsing "+80": invalid syntax'),
    ("", 'strconv.ParseUint: parsing "": invalid syntax'),
    ('a"b', 'strconv.ParseUint: parsing "a\\"b": invalid syntax'),
])
def test_port_numbers_are_refused_in_gos_words(text: str, why: str | None) -> None:
    """kubectl's parsePorts: strconv.ParseUint(s, 10, 16), its error as Go words it."""
    from crishim.client.cluster import _go_parse_uint16

    assert _go_parse_uint16(text) == why


@pytest.mark.parametrize("text, value", [
    ("80", 80), ("+80", 80), ("-1", -1), ("9223372036854775807", (1 << 63) - 1),
    ("9223372036854775808", None), ("", None), ("x", None), ("1" * 5000, None),
    ("٨٠", None),
])
def test_atoi_is_gos(text: str, value: int | None) -> None:
    """strconv.Atoi, which kubectl's name translation asks first (a failure is a name)."""
    from crishim.client.cluster import _go_atoi

    assert _go_atoi(text) == value
