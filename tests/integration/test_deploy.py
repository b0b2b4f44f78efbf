"""deploy/ holds what a node operator copies: the manifests render, the example configs load,
the systemd units name real flags."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess

import pytest
import yaml

from crishim.cli import build_parser
from crishim.config import SETTINGS, load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
KUBECTL = "/usr/bin/kubectl"
EXAMPLES = sorted(f for f in os.listdir(os.path.join(DEPLOY, "examples")) if f.endswith(".toml"))


@pytest.fixture(scope="module")
def helper_manifests() -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", os.path.join(DEPLOY, "helper")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_helper_kustomization_renders_a_namespace_and_a_daemonset(helper_manifests):
    kinds = sorted(doc["kind"] for doc in helper_manifests)
    assert kinds == ["DaemonSet", "Namespace"]
    for doc in helper_manifests:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "crishim"


def test_helper_daemonset_is_privileged_with_the_socket_on_a_host_path(helper_manifests):
    ds = next(d for d in helper_manifests if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] and pod["hostNetwork"]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["image"] == "crishim:0.1.0"
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "helper"
    assert args.helper_socket == "/run/crishim/helper.sock"
    assert args.helper_mode in SETTINGS["helper_mode"].choices
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["run-crishim"]["name"]] == "/run/crishim"
    assert os.path.dirname(args.helper_socket) == mounts["run-crishim"]["mountPath"]
    assert volumes["netns"] == "/var/run/netns"
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_loads(name):
    path = os.path.join(DEPLOY, "examples", name)
    config = load(path, env={})
    assert config.socket.endswith(".sock")


def test_both_examples_exist():
    assert {"containerd-proxy.toml", "lab.toml"} <= set(EXAMPLES)


def test_containerd_proxy_example_names_an_upstream_and_a_runtime_plugin():
    config = load(os.path.join(DEPLOY, "examples", "containerd-proxy.toml"), env={})
    assert config.upstream_endpoint.startswith("unix:///")
    assert config.runtime in ("containerd", "helper")


def _exec_start(unit: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(os.path.join(DEPLOY, "systemd", unit))
    return shlex.split(parser["Service"]["ExecStart"])


def test_systemd_unit_runs_crishim_serve_with_real_flags():
    argv = _exec_start("crishim.service")
    assert os.path.basename(argv[0]) == "crishim"
    args = build_parser().parse_args(argv[1:])  # an unknown flag exits here
    assert args.command == "serve"
    assert args.config == "/etc/crishim/crishim.toml"
    # the unit's settings are the example file installed there: socket and upstream
    config = load(os.path.join(DEPLOY, "examples", "containerd-proxy.toml"), env={})
    assert config.socket == "/run/crishim/crishim.sock"
    assert config.upstream_endpoint


def test_systemd_helper_unit_runs_crishim_helper_with_real_flags():
    argv = _exec_start("crishim-helper.service")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "helper"
    assert args.helper_socket == "/run/crishim/helper.sock"


def test_systemd_unit_restarts_on_failure_and_says_what_it_needs():
    with open(os.path.join(DEPLOY, "systemd", "crishim.service")) as f:
        text = f.read()
    assert "Restart=on-failure" in text
    assert "CAP_SYS_ADMIN" in text and "CAP_NET_ADMIN" in text


def test_kubelet_snippets_point_at_the_crishim_socket():
    with open(os.path.join(DEPLOY, "kubelet", "kubelet-config.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["kind"] == "KubeletConfiguration"
    assert cfg["containerRuntimeEndpoint"] == "unix:///run/crishim/crishim.sock"
    installed = load(os.path.join(DEPLOY, "examples", "containerd-proxy.toml"), env={})
    assert cfg["containerRuntimeEndpoint"] == "unix://" + installed.socket
    with open(os.path.join(DEPLOY, "kubelet", "10-crishim.conf")) as f:
        assert "--container-runtime-endpoint=unix:///run/crishim/crishim.sock" in f.read()
