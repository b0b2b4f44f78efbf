"""The cluster path's pure parts: pod targets and the kubeconfig loader's credentials."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from crishim.client.cluster import ClusterError, load_cluster, pod_name


@pytest.mark.parametrize("target", ["web", "pod/web", "pods/web", "po/web"])
def test_pod_targets_as_kubectl(target: str) -> None:
    assert pod_name(target) == "web"


@pytest.mark.parametrize("target", ["deploy/web", "svc/web", "pod/", "pod/a/b"])
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(ClusterError, match="only pods"):
        pod_name(target)


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
