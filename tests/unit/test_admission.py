"""The one admission path: every refusal and its status, the same for HTTP/1.1 upgrades
and HTTP/2's first stream, rendered once per protocol."""

from __future__ import annotations

import asyncio

import pytest

from crishim.config import Config
from crishim.forward import ForwardContext
from crishim.runtime import RuntimeError_, Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from crishim.stream.admission import (
    Admission,
    Refused,
    h2_refusal,
    http1_refusal,
    redact,
    redact_text,
)
from crishim.stream.portforward_h2 import settings_header
from crishim.tokens import StreamRequest, TokenStore


class Door:
    """An Admission over a real token store and the netns plugin's sandbox map."""

    def __init__(self) -> None:
        self.tokens = TokenStore()
        self.live = 0
        self.draining = False
        plugin = NamedNetnsRuntime(Config(sandboxes={"web": "host", "gone": "/nonexistent/ns"}))
        self.ctx = ForwardContext(plugin, fd_budget=1000)
        self.admission = Admission(self.tokens, self.ctx, 2, lambda: self.live,
                                   lambda: self.draining)

    def url(self, sandbox: str = "web") -> str:
        return "/portforward/" + self.tokens.issue(StreamRequest(sandbox, (80,)))

    def status(self, method: str, target: str, methods: tuple[str, ...] = ("GET", "POST")):
        try:
            admitted = asyncio.run(self.admission(method, target, methods))
        except Refused as e:
            return e.status, e
        return 200, admitted


def test_a_valid_token_is_redeemed_once_with_its_query():
    door = Door()
    url = door.url()
    status, admitted = door.status("POST", url + "?port=8080")
    assert status == 200
    assert admitted.sandbox.id == "web" and admitted.query == {"port": ["8080"]}
    assert door.status("POST", url)[0] == 404  # single use


@pytest.mark.parametrize("setup, method, methods, expected", [
    ("draining", "POST", ("GET", "POST"), 503),
    ("full", "POST", ("GET", "POST"), 429),
    ("no descriptors", "POST", ("GET", "POST"), 503),
    ("", "PUT", ("GET", "POST"), 405),
    ("", "GET", ("POST",), 405),  # HTTP/2 streams are POST
])
def test_refusals_come_before_the_token_is_spent(setup, method, methods, expected):
    door = Door()
    url = door.url()
    door.draining = setup == "draining"
    door.live = 2 if setup == "full" else 0
    door.ctx.live_connections = door.ctx.fd_budget if setup == "no descriptors" else 0
    status, refused = door.status(method, url, methods)
    assert status == expected
    door.draining, door.live, door.ctx.live_connections = False, 0, 0
    assert door.status("POST", url)[0] == 200  # the refused request did not use it up


def test_unknown_path_token_and_sandboxes():
    door = Door()
    assert door.status("GET", "/exec/abc")[0] == 404
    assert door.status("GET", "/portforward/nosuchtoken")[0] == 404
    assert door.status("GET", door.url("gone"))[0] == 410
    status, refused = door.status("GET", door.url("missing"))
    assert status == 404 and "missing" in refused.reason


def test_a_refusal_rendered_for_http1_and_http2():
    refused = Refused(405, "method PUT not allowed", [("Allow", "GET, POST")])
    raw = http1_refusal(refused)
    assert raw.startswith(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, POST\r\n")
    assert raw.endswith(b"\r\n\r\nmethod PUT not allowed\n")
    headers, body = h2_refusal(refused)
    assert (":status", "405") in headers and ("allow", "GET, POST") in headers
    assert body == b"method PUT not allowed\n"


@pytest.mark.parametrize("value", ["", "AAMAAABk", "AAMAAABkAAQBAAAA"])
def test_http2_settings_that_are_base64url_settings(value):
    assert settings_header(value).rstrip(b"=") == value.encode()


@pytest.mark.parametrize("value", ["!!!!", "AAMAAABk!", "AAMAAAB+", "AAMAAA", "A"])
def test_http2_settings_that_are_not(value):
    with pytest.raises(ValueError):
        settings_header(value)


class _UnavailableRuntime(NamedNetnsRuntime):
    async def resolve(self, sandbox_id: str) -> Sandbox:
        raise RuntimeError_("upstream runtime unix:///run/x.sock did not answer")


def test_an_unavailable_runtime_is_a_503_not_a_500():
    door = Door()
    door.admission.plugin = _UnavailableRuntime(Config(sandboxes={"web": "host"}))
    status, refused = door.status("POST", door.url())
    assert status == 503 and "did not answer" in refused.reason
    assert ("Retry-After", "1") in refused.headers


TOKEN = "AbCdEfGhIjKlMnOpQrStUv"  # secrets.token_urlsafe(16): 22 characters


@pytest.mark.parametrize("path", [
    f"/portforward/{TOKEN}",
    f"/portforward/{TOKEN}/",
    f"//portforward/{TOKEN}",
    f"/portforward/{TOKEN}/extra/segments",
    f"/PortForward/{TOKEN}",
    f"/portforward//{TOKEN}",
    f"/other/{TOKEN}",
    f"/{TOKEN}",
    f"/portforward{TOKEN}",
    f"http://host:1234/portforward/{TOKEN}?port=80",
    f"/portforward/{TOKEN}?token={TOKEN}",
    f"/portforward/{TOKEN}#{TOKEN}",
])
def test_redact_never_shows_a_whole_token_whatever_the_paths_shape(path):
    shown = redact(path)
    assert TOKEN not in shown
    assert TOKEN[:5] not in shown  # only the first 4 characters of any token-like segment
    assert "…" in shown


def test_redact_keeps_what_identifies_the_request():
    assert redact(f"/portforward/{TOKEN}") == "/portforward/AbCd…"
    assert redact("/healthz") == "/healthz"
    assert redact("/portforward/") == "/portforward/"
    assert redact("/portforward/abc") == "/portforward/abc"  # too short to be one


def test_redact_text_cuts_a_token_quoted_in_a_parsers_message():
    message = f"illegal request line: bytearray(b'GET /portforward/{TOKEN} HTTP/1.1 x')"
    shown = redact_text(message)
    assert TOKEN[:5] not in shown
    assert shown == ("illegal request line: bytearray(b'GET /portforward/AbCd… HTTP/1.1 x')")


def test_sessions_that_waited_for_the_output_budget_get_it_in_turn():
    """A session admitted while the output budget is spent waits (64 KiB meanwhile) and is
    granted, oldest first, as soon as what others return covers it; one that ends while
    waiting is forgotten and takes nothing."""
    from crishim.budget import FloodLimits

    ctx = ForwardContext(NamedNetnsRuntime(Config(sandboxes={})),
                         flood=FloodLimits(buffer_budget=100))
    granted: list[str] = []
    assert ctx.take_output(60) and ctx.take_output(40)
    assert not ctx.take_output(30)
    for name, need in (("a", 30), ("gone", 10), ("b", 50), ("c", 10)):
        ctx.wait_for_output(name, need, lambda name=name: granted.append(name))
    ctx.forget_output_wait("gone")  # ended while waiting
    ctx.return_output(40)  # 60 taken: a (30) fits, b (50) does not; c waits behind b
    assert granted == ["a"] and ctx.output_granted == 90
    ctx.return_output(60)  # 30 taken: b and c
    assert granted == ["a", "b", "c"] and ctx.output_granted == 90
    ctx.return_output(90)
    assert ctx.output_granted == 0 and granted == ["a", "b", "c"]
