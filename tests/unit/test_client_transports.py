"""The client's transport registry: what `--transport` accepts is what open_session opens."""

import asyncio
import gc
import inspect

import pytest

from crishim.cli import build_parser
from crishim.client.cluster import CLUSTER_TRANSPORTS
from crishim.client.transports import (
    TRANSPORTS,
    open_session,
    transport_named,
    without_userinfo,
)


def _cli_transport_choices() -> dict[str, list[str]]:
    """The --transport choices of every client subcommand, read off the real parser."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "check" in a.choices)
    found = {}
    for command in ("port-forward", "check"):
        sub = subparsers.choices[command]
        action = next(a for a in sub._actions if "--transport" in a.option_strings)
        found[command] = list(action.choices)
    return found


def test_every_transport_the_cli_accepts_has_an_opener():
    choices = _cli_transport_choices()
    # port-forward also takes "auto": with --kubeconfig, cluster.py picks a real transport
    assert choices == {"port-forward": list(TRANSPORTS) + ["auto"], "check": list(TRANSPORTS)}
    assert set(TRANSPORTS) == {"spdy", "websocket", "spdy-over-websocket", "h2"}
    for name in TRANSPORTS:
        transport = transport_named(name)
        assert transport.name == name
        assert inspect.iscoroutinefunction(transport.open), name
        assert transport.alpn == ("h2" if name == "h2" else "http/1.1")


def test_what_auto_falls_back_to_through_an_api_server_is_registered():
    for name in CLUSTER_TRANSPORTS:
        if name != "auto":
            assert transport_named(name).name == name


def test_the_default_transport_is_spdy_first_in_the_list():
    assert TRANSPORTS[0] == "spdy"
    args = build_parser().parse_args(["check", "--sandbox", "sandbox"])
    assert args.transport == "spdy"


def test_an_unknown_transport_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown transport 'quic'; choose from spdy, "
                                         r"websocket, spdy-over-websocket, h2"):
        transport_named("quic")


def test_open_session_refuses_an_unknown_transport_before_connecting():
    async def main() -> None:
        # port 9 on loopback: nothing is dialled, the name is refused first
        with pytest.raises(ValueError, match="unknown transport 'quic'"):
            await open_session("http://127.0.0.1:9/portforward/x", "quic")

    asyncio.run(main())


def test_the_cli_rejects_an_unknown_transport(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["port-forward", "sandbox", "8080", "--transport", "quic"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'quic'" in capsys.readouterr().err


@pytest.mark.parametrize("transport", ["websocket", "spdy"])
def test_an_upgrade_given_up_leaves_no_unretrieved_error(transport):
    """An opening abandoned while it waits for the upgrade's answer (crishim port-forward
    ending with a session being opened ahead) must not leave an error nobody retrieves:
    asyncio would log "Future exception was never retrieved" once the server closes."""
    unreported: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unreported.append(context))
        held: list[asyncio.StreamWriter] = []

        async def accept(reader, writer):  # reads the request, never answers
            held.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        opening = asyncio.ensure_future(
            open_session(f"http://127.0.0.1:{port}/portforward/x", transport, [80]))
        while not held:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the request is written: it waits for the answer
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        for writer in held:
            writer.close()  # the server goes: the answer's future fails
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert not [c for c in unreported if "never retrieved" in c.get("message", "")], \
        unreported


@pytest.mark.parametrize("url,shown", [
    ("http://u:pw@h:1/portforward/t", "http://***@h:1/portforward/t"),
    ("https://u@[::1]:443/x?q=a@b#f@g", "https://***@[::1]:443/x?q=a@b#f@g"),
    ("http://a@b@h/x", "http://***@h/x"),  # the last @ before the path ends the userinfo
    ("http://h:1/x@y", "http://h:1/x@y"),  # an @ in the path is not userinfo
    ("http://h?x=@", "http://h?x=@"),
    ("not a url @ all", "not a url @ all"),
])
def test_without_userinfo_hides_credentials_and_nothing_else(url, shown):
    assert without_userinfo(url) == shown


@pytest.mark.parametrize("flag,value", [
    ("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "-1"),
    ("--timeout", "soon"), ("--ping-interval", "0.001"), ("--ping-interval", "-1"),
    ("--ping-interval", "inf"), ("--timeout", "30x"), ("--timeout", "0s"),
    ("--timeout", "1e300h"), ("--ping-interval", "1ms"),
])
def test_the_cli_refuses_seconds_it_cannot_use(capsys, flag: str, value: str):
    """inf was 'timed out after infs' at once; a PING every 1 ms ran past crishim serve's
    control budget and ended the session within 2 s."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["port-forward", "sandbox", "8080", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: '{value}'" in capsys.readouterr().err


def test_the_cli_takes_seconds_it_can_use():
    args = build_parser().parse_args(["port-forward", "sandbox", "8080", "--timeout", "0.5",
                                      "--ping-interval", "0"])
    assert (args.timeout, args.ping_interval) == (0.5, 0.0)
    args = build_parser().parse_args(["port-forward", "sandbox", "8080", "--ping-interval",
                                      "0.2"])
    assert args.ping_interval == 0.2


@pytest.mark.parametrize("command", [["port-forward", "sandbox", "8080"],
                                     ["check", "--sandbox", "sandbox"]])
def test_the_cli_takes_durations_as_serve_does(command):
    """`--timeout 30s` was "'30s' is not a number of seconds" while `serve` takes Go-style
    durations; a bare number stays seconds."""
    for given, seconds in (("30s", 30.0), ("1m30s", 90.0), ("250ms", 0.25), ("2", 2.0)):
        assert build_parser().parse_args([*command, "--timeout", given]).timeout == seconds
    if command[0] == "port-forward":
        assert build_parser().parse_args([*command, "--ping-interval", "500ms"]
                                         ).ping_interval == 0.5


class _Wire:
    """A session transport that keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.written += chunk

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("code, extra, reason", [
    (0, b"", "the server sent GOAWAY (status 0)"),  # it said "(0)" where SPDY says this
    (11, b"calm down", "the server sent GOAWAY (status 11 ENHANCE_YOUR_CALM: calm down)"),
])
def test_an_h2_goaway_is_worded_as_spdys(code: int, extra: bytes, reason: str) -> None:
    import h2.config
    import h2.connection

    from crishim.client.transports.h2 import H2ClientSession

    async def go() -> str:
        session = H2ClientSession("127.0.0.1:1", "/portforward/x", "http")
        session.transport = _Wire()  # type: ignore[assignment]
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        server.close_connection(error_code=code, additional_data=extra or None)
        session.receive(server.data_to_send())
        return await asyncio.wait_for(session.closed, 5)

    assert asyncio.run(go()) == reason
