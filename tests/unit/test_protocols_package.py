"""The shape of crishim.protocols: codecs that import nothing else from crishim, one event
base per codec with frozen slotted events, every public name re-exported by its package,
and shared constants that keep their wire values."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import crishim.protocols
from crishim.protocols import constants, spdy
from crishim.protocols import websocket as ws
from crishim.protocols.spdy import events as spdy_events
from crishim.protocols.websocket import events as ws_events

ROOT = Path(crishim.protocols.__file__).resolve().parents[2]


def protocol_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(
        crishim.protocols.__path__, "crishim.protocols."))


def test_walk_finds_every_codec_module() -> None:
    names = protocol_modules()
    for expected in ("crishim.protocols.constants", "crishim.protocols.h2",
                     "crishim.protocols.spdy.compression", "crishim.protocols.spdy.connection",
                     "crishim.protocols.spdy.events", "crishim.protocols.websocket.channels",
                     "crishim.protocols.websocket.framing",
                     "crishim.protocols.websocket.handshake"):
        assert expected in names


def test_protocols_import_nothing_else_from_crishim() -> None:
    # A fresh interpreter, so modules other tests imported cannot hide a dependency.
    script = (
        "import importlib, json, sys\n"
        f"for name in {protocol_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('crishim'))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    loaded = json.loads(out)
    assert "crishim.protocols.spdy.connection" in loaded
    outside = [m for m in loaded if m != "crishim" and not m.startswith("crishim.protocols")]
    assert outside == []


def event_classes(module: object, base: type) -> list[type]:
    return [cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and cls is not base]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("module", "base", "expected"), [
    (spdy_events, spdy.Event, {"DataReceived", "StreamOpened", "SessionTerminated"}),
    (ws_events, ws.Event, {"TunnelData", "ChannelData", "Closed", "Message"}),
])
def test_events_share_one_base_and_are_frozen_and_slotted(module: object, base: type,
                                                          expected: set[str]) -> None:
    classes = event_classes(module, base)
    assert expected <= {cls.__name__ for cls in classes}
    for cls in classes:
        assert issubclass(cls, base), cls
        assert dataclasses.is_dataclass(cls), cls
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, cls
        # Slots on the base and every event: no per-event __dict__ on the hot path.
        assert "__dict__" not in dir(cls), cls
        fields = dataclasses.fields(cls)
        event = cls(*(0 for _ in fields))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, fields[0].name, 1)


def test_codecs_return_events_of_their_base() -> None:
    server = spdy.SpdyConnection(spdy.SpdyConfig())
    client = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
    sid = client.open_stream({"streamtype": "data", "port": "80"})
    client.send_data(sid, b"hello")
    spdy_got = server.receive_data(client.data_to_send())
    assert [type(e) for e in spdy_got] == [spdy.StreamOpened, spdy.DataReceived]
    assert all(isinstance(e, spdy.Event) for e in spdy_got)

    tunnel_server = ws.ByteStreamTunnel()
    tunnel_client = ws.ByteStreamTunnel(client=True)
    tunnel_client.send(b"bytes")
    ws_got = tunnel_server.receive_data(tunnel_client.data_to_send())
    assert ws_got == [ws.TunnelData(b"bytes")]
    assert all(isinstance(e, ws.Event) for e in ws_got)


@pytest.mark.parametrize("package", [spdy, ws])
def test_package_reexports_every_public_class_and_function(package: object) -> None:
    exported = set(package.__all__)  # type: ignore[attr-defined]
    for name in exported:
        assert hasattr(package, name), name
    for info in pkgutil.iter_modules(package.__path__):  # type: ignore[attr-defined]
        module = importlib.import_module(f"{package.__name__}.{info.name}")  # type: ignore[attr-defined]
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                assert name in exported, f"{module.__name__}.{name} is not re-exported"


def test_shared_constants_keep_their_wire_values() -> None:
    assert constants.PORTFORWARD_PROTOCOL == "portforward.k8s.io"
    assert ws.SPDY_TUNNEL == "SPDY/3.1+portforward.k8s.io"
    assert (constants.HEADER_STREAM_TYPE, constants.HEADER_PORT,
            constants.HEADER_REQUEST_ID) == ("streamtype", "port", "requestid")
    assert (constants.STREAM_TYPE_DATA, constants.STREAM_TYPE_ERROR) == ("data", "error")
    assert constants.H2_STREAM_WINDOW == 16 * 1024 * 1024
    assert constants.H2_CONNECTION_WINDOW == 256 * 1024 * 1024
