"""The real-containerd harness works: a pod sandbox comes up with a netns we can see.

Without the prerequisites (root, containerd, runc, gcc, CNI plugins) these tests skip,
or fail when the CI environment variable is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crishim.cri import api_pb2
from tests.support.containerd_env import (
    CONTAINERD_RUN_DIR,
    ContainerdEnv,
    ContainerdUnavailable,
    skip_or_fail,
)


@pytest.fixture(scope="module")
def env() -> Iterator[ContainerdEnv]:
    started = time.monotonic()
    try:
        harness = ContainerdEnv()
        harness.start()
    except ContainerdUnavailable as e:
        skip_or_fail(e.reason)
    print(f"containerd harness up in {time.monotonic() - started:.2f}s: {harness.timings}")
    yield harness
    harness.close()


def test_version_names_containerd(env: ContainerdEnv) -> None:
    version = env.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version


def test_pause_image_is_listed(env: ContainerdEnv) -> None:
    tags = [tag for image in env.list_images() for tag in image.repo_tags]
    assert "localhost/crishim/pause:test" in tags


def test_sandbox_lifecycle_and_netns(env: ContainerdEnv) -> None:
    sandbox_id = env.run_pod_sandbox("web", namespace="crishim-test")
    try:
        netns = env.netns_path(sandbox_id)
        assert netns.startswith(str(env.dir)), "netns_mounts_under_state_dir is not in effect"
        assert Path(netns).exists()
        # the pod netns is a different network namespace from ours
        assert os.stat(netns).st_ino != os.stat("/proc/self/ns/net").st_ino

        status = env.sandbox_status(sandbox_id).status
        assert status.state == api_pb2.SANDBOX_READY
        assert status.network.ip == "127.0.0.1"
        assert status.linux.namespaces.options.network == api_pb2.POD
        assert status.metadata.name == "web" and status.metadata.namespace == "crishim-test"

        pid = env.sandbox_info(sandbox_id)["pid"]
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino

        listed = {s.id: s for s in env.list_sandboxes()}
        assert listed[sandbox_id].state == api_pb2.SANDBOX_READY
    finally:
        env.stop_and_remove(sandbox_id)
    assert sandbox_id not in {s.id for s in env.list_sandboxes()}
    assert not Path(netns).exists()


def test_host_network_sandbox_has_no_netns_path(env: ContainerdEnv) -> None:
    sandbox_id = env.run_pod_sandbox("hostnet", host_network=True)
    try:
        assert env.netns_path(sandbox_id) == ""
        status = env.sandbox_status(sandbox_id).status
        assert status.linux.namespaces.options.network == api_pb2.NODE
    finally:
        env.stop_and_remove(sandbox_id)


def test_containerd_portforward_answers_a_url(env: ContainerdEnv) -> None:
    """containerd's own stream server is up: a baseline for crishim's."""
    sandbox_id = env.run_pod_sandbox("pf")
    try:
        url = env.runtime.PortForward(
            api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id, port=[80])
        ).url
        assert url.startswith("http://127.0.0.1:") and "/portforward/" in url
    finally:
        env.stop_and_remove(sandbox_id)


def test_close_removes_pods_process_and_files() -> None:
    run_dir_existed = CONTAINERD_RUN_DIR.exists()
    try:
        harness = ContainerdEnv()
        harness.start()
    except ContainerdUnavailable as e:
        skip_or_fail(e.reason)
    directory, pid = harness.dir, harness.pid
    harness.run_pod_sandbox("left-behind")  # close() must remove it
    harness.close()
    assert directory is not None and not directory.exists()
    assert (
        harness.process is None and not Path(f"/proc/{pid}/cmdline").read_bytes()
        if Path(f"/proc/{pid}").exists()
        else True
    )  # gone, or the pid already reused
    if not run_dir_existed and CONTAINERD_RUN_DIR.exists():
        # only another runtime's live entries may keep it
        assert any(CONTAINERD_RUN_DIR.rglob("*")), "left an empty /run/containerd behind"
    harness.close()  # twice is fine
