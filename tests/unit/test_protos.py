"""The committed CRI modules match protos/api.proto, and the wire numbers match upstream CRI."""

from __future__ import annotations

from pathlib import Path

import pytest

from crishim.cri import api_pb2, api_pb2_grpc, protogen


def test_regenerated_files_are_identical(tmp_path: Path) -> None:
    import grpc_tools  # noqa: F401 - a test extra: its absence is a failure
    protogen.generate(tmp_path)
    for name in protogen.GENERATED:
        committed = protogen.PACKAGE_DIR / name
        fresh = tmp_path / name
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"{name} is stale: run `python3 -m crishim.cri.protogen` and commit the result"
        )


def test_grpc_module_imports_package_relative() -> None:
    text = (protogen.PACKAGE_DIR / "api_pb2_grpc.py").read_text()
    assert "from . import api_pb2 as api__pb2" in text
    assert "\nimport api_pb2" not in text


def _numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    "message, expected",
    [
        (api_pb2.PortForwardRequest, {"pod_sandbox_id": 1, "port": 2}),
        (api_pb2.PortForwardResponse, {"url": 1}),
        (api_pb2.VersionRequest, {"version": 1}),
        (
            api_pb2.VersionResponse,
            {"version": 1, "runtime_name": 2, "runtime_version": 3, "runtime_api_version": 4},
        ),
        (api_pb2.PodSandboxStatusRequest, {"pod_sandbox_id": 1, "verbose": 2}),
        (
            api_pb2.PodSandboxStatusResponse,
            {"status": 1, "info": 2, "containers_statuses": 3, "timestamp": 4},
        ),
        (
            api_pb2.NamespaceOption,
            {"network": 1, "pid": 2, "ipc": 3, "target_id": 4, "userns_options": 5},
        ),
        (api_pb2.Namespace, {"options": 2}),
        (api_pb2.PodSandboxNetworkStatus, {"ip": 1, "additional_ips": 2}),
        (api_pb2.PodSandboxMetadata, {"name": 1, "uid": 2, "namespace": 3, "attempt": 4}),
        (api_pb2.RunPodSandboxRequest, {"config": 1, "runtime_handler": 2}),
        (
            api_pb2.ExecRequest,
            {
                "container_id": 1,
                "cmd": 2,
                "tty": 3,
                "stdin": 4,
                "stdout": 5,
                "stderr": 6,
                "audit_request_id": 7,
            },
        ),
        (
            api_pb2.AttachRequest,
            {
                "container_id": 1,
                "stdin": 2,
                "tty": 3,
                "stdout": 4,
                "stderr": 5,
                "audit_request_id": 6,
            },
        ),
    ],
)
def test_field_numbers(message, expected: dict[str, int]) -> None:
    numbers = _numbers(message)
    for name, number in expected.items():
        assert numbers.get(name) == number, f"{message.DESCRIPTOR.name}.{name}"


def test_selected_numbers_and_types() -> None:
    status = api_pb2.PodSandboxStatus.DESCRIPTOR.fields_by_name
    assert [
        status[n].number
        for n in (
            "id",
            "metadata",
            "state",
            "created_at",
            "network",
            "linux",
            "labels",
            "annotations",
            "runtime_handler",
        )
    ] == list(range(1, 10))
    sec = api_pb2.LinuxSandboxSecurityContext.DESCRIPTOR.fields_by_name
    assert sec["run_as_group"].number == 8
    assert sec["supplemental_groups_policy"].number == 11
    assert api_pb2.ImageSpec.DESCRIPTOR.fields_by_name["user_specified_image"].number == 18
    assert api_pb2.NamespaceMode.Value("NODE") == 2
    assert api_pb2.PodSandboxState.Value("SANDBOX_NOTREADY") == 1
    port = api_pb2.PortForwardRequest.DESCRIPTOR.fields_by_name["port"]
    assert port.is_repeated and port.type == port.TYPE_INT32


def test_wire_bytes() -> None:
    # field 1 (LEN) "abc"; field 2 packed int32 [80, 443]
    req = api_pb2.PortForwardRequest(pod_sandbox_id="abc", port=[80, 443])
    assert req.SerializeToString() == b"\x0a\x03abc\x12\x03\x50\xbb\x03"


def test_unknown_fields_survive_reencoding() -> None:
    # PodSandboxConfig field 9 (windows) is not declared: it must pass through untouched.
    raw = api_pb2.PodSandboxConfig(hostname="h").SerializeToString() + b"\x4a\x02\x0a\x00"
    again = api_pb2.PodSandboxConfig.FromString(raw).SerializeToString()
    assert again == raw


def test_services_and_paths() -> None:
    pool = api_pb2.DESCRIPTOR
    assert pool.package == "runtime.v1"
    runtime = pool.services_by_name["RuntimeService"]
    assert {
        "Version",
        "PortForward",
        "PodSandboxStatus",
        "RunPodSandbox",
        "StopPodSandbox",
        "RemovePodSandbox",
        "ListPodSandbox",
        "Exec",
        "Attach",
        "GetContainerEvents",
    } <= set(runtime.methods_by_name)
    events = runtime.methods_by_name["GetContainerEvents"]
    assert events.server_streaming and not events.client_streaming
    image = pool.services_by_name["ImageService"]
    assert "ListImages" in image.methods_by_name
    assert hasattr(api_pb2_grpc, "RuntimeServiceStub")
    assert hasattr(api_pb2_grpc, "add_ImageServiceServicer_to_server")
