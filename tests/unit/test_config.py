import subprocess
import sys

import pytest

from crishim.cli import build_parser
from crishim.config import SETTINGS, ConfigError, load, parse_duration, unknown_environment


def test_durations():
    assert parse_duration("4h") == 14400
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("15") == 15
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration("soon")


def test_precedence_file_then_env_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('token_ttl = "2m"\nmax_tokens = 5\nerror_policy = "verbose"\n'
                 '[sandboxes]\nweb = "/var/run/netns/web"\n')
    cfg = load(str(f), env={})
    assert (cfg.token_ttl, cfg.max_tokens, cfg.error_policy) == (120, 5, "verbose")
    assert cfg.sandboxes == {"web": "/var/run/netns/web"}
    cfg = load(str(f), env={"CRISHIM_MAX_TOKENS": "7"})
    assert cfg.max_tokens == 7 and cfg.token_ttl == 120
    cfg = load(str(f), env={"CRISHIM_MAX_TOKENS": "7"}, overrides={"max_tokens": 9})
    assert cfg.max_tokens == 9


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="error_policy"):
        load(None, env={"CRISHIM_ERROR_POLICY": "loud"})
    with pytest.raises(ConfigError, match="max_tokens"):
        load(None, env={"CRISHIM_MAX_TOKENS": "many"})
    f = tmp_path / "c.toml"
    f.write_text("no_such_thing = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'no_such_thing'"):
        load(str(f), env={})


def test_serve_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for name in SETTINGS:
        assert "--" + name.replace("_", "-") in out, name


def test_runtime_defaults_to_netns_without_an_upstream() -> None:
    assert load(env={}).chosen_runtime()[0] == "netns"


def test_runtime_defaults_to_containerd_with_an_upstream() -> None:
    name, why = load(env={}, overrides={"upstream_endpoint": "/run/c.sock"}).chosen_runtime()
    assert name == "containerd" and "upstream_endpoint" in why


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
def test_an_explicit_runtime_wins_over_the_upstream_default(source: str, tmp_path) -> None:
    path, env, overrides = None, {}, {"upstream_endpoint": "/run/c.sock"}
    if source == "flag":
        overrides["runtime"] = "netns"
    elif source == "env":
        env = {"CRISHIM_RUNTIME": "netns"}
    else:
        path = tmp_path / "crishim.toml"
        path.write_text('runtime = "netns"\n')
    assert load(str(path) if path else None, env, overrides).chosen_runtime()[0] == "netns"


def test_upstream_version_is_on_by_default_and_can_be_turned_off() -> None:
    assert load(env={}).upstream_version is True
    assert load(env={"CRISHIM_UPSTREAM_VERSION": "false"}).upstream_version is False


@pytest.mark.parametrize("value", ["0s", "-1s"])
def test_dial_timeout_must_be_positive(value: str) -> None:
    assert load(env={}).dial_timeout == 20
    assert load(env={"CRISHIM_DIAL_TIMEOUT": "750ms"}).dial_timeout == 0.75
    with pytest.raises(ConfigError, match="dial_timeout"):
        load(env={"CRISHIM_DIAL_TIMEOUT": value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "NaN"])
def test_a_duration_is_finite_and_bounded(value: str) -> None:
    """nan passed every comparison a limit made (and failed every forward later, in the
    event loop); inf and 1e300 overflow its timers."""
    with pytest.raises(ConfigError, match="dial_timeout"):
        load(env={"CRISHIM_DIAL_TIMEOUT": value})
    with pytest.raises(ConfigError, match="not a duration|more than"):
        parse_duration(float(value), "x")
    assert parse_duration("87600h") == 87600 * 3600  # 10 years is still a duration


def test_an_int_setting_takes_whole_numbers_only(tmp_path) -> None:
    f = tmp_path / "c.toml"
    # a TOML integer only: 2.0 and "3" were taken (the environment's "3" still is)
    for text, ok in (("1.5", False), ("2", True), ("2.0", False), ("inf", False),
                     ("nan", False), ("true", False), ('"3"', False)):
        f.write_text(f"max_tokens = {text}\n")
        if ok:
            assert load(str(f), env={}).max_tokens == int(text)
        else:
            with pytest.raises(ConfigError, match="max_tokens: .* is not an integer"):
                load(str(f), env={})
    assert load(env={"CRISHIM_MAX_TOKENS": "3"}).max_tokens == 3


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:", "127.0.0.1:99999",
                                     "127.0.0.1:-1", "127.0.0.1:9x", ":0", "::1:9090",
                                     "127.0.0.1:٩٠٩٠"])
def test_metrics_address_is_host_and_port(address: str) -> None:
    with pytest.raises(ConfigError, match="metrics_address: .* is not HOST:PORT"):
        load(env={"CRISHIM_METRICS_ADDRESS": address})


@pytest.mark.parametrize("address", [":9090", "127.0.0.1:9090", "[::1]:9090", "localhost:1"])
def test_metrics_address_accepts(address: str) -> None:
    assert load(env={"CRISHIM_METRICS_ADDRESS": address}).metrics_address == address


def test_client_help_names_only_options_the_command_has(capsys):
    """check's --timeout help spoke of --kubeconfig's pod GET, an option check refuses."""
    for command, has_kubeconfig in (("check", False), ("port-forward", True)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert ("--kubeconfig" in out) == has_kubeconfig, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["check", "--help"])
    assert "UDP echo" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("value, words", [
    ("-5", "must not be negative"),
    ("1e12", "100 years"),
    ("5x", "examples: 30s, 1m, 4h"),
])
def test_a_bad_duration_setting_says_what_is_wrong_with_it(value: str, words: str) -> None:
    """A setting's duration error kept only "is not a valid duration": the reason (and
    the examples) parse_duration gives were replaced on the way."""
    with pytest.raises(ConfigError, match=f"token_ttl: .*{words}"):
        load(env={"CRISHIM_TOKEN_TTL": value})


def test_serve_help_shows_defaults_as_they_are_written(capsys):
    """Durations showed as seconds ([default: 14400.0] for 4h), strings as Python reprs."""
    from crishim.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown_default in ("[default: 4h]", "[default: 5ms]", "[default: 1m]",
                          "[default: /run/crishim/crishim.sock]", "[default: none]",
                          "[default: true]"):
        assert shown_default in text
    assert "[default: 14400.0]" not in text and "[default: ''" not in text


def test_a_misspelt_environment_variable_is_named():
    env = {"CRISHIM_MAX_TOKEN": "5", "CRISHIM_MAX_TOKENS": "5", "CRISHIM_KEEP_LOGS": "1",
           "PATH": "/bin"}
    assert unknown_environment(env) == ["CRISHIM_MAX_TOKEN"]


@pytest.mark.parametrize("name", ["STREAM_REQUEST_TIMEOUT", "STREAM_CREATION_TIMEOUT",
                                  "DIAL_TIMEOUT", "TOKEN_TTL"])
def test_a_timeout_of_zero_that_would_refuse_everything_is_refused(name: str) -> None:
    """stream_request_timeout 0 answered every upgrade 408 and a creation timeout of 0
    failed every pair: serve refuses them at start-up instead."""
    with pytest.raises(ConfigError, match=f"{name.lower()}: must be positive"):
        load(env={f"CRISHIM_{name}": "0s"})


@pytest.mark.parametrize("name", ["STREAM_IDLE_TIMEOUT", "DRAIN_TIMEOUT"])
def test_timeouts_where_zero_means_never_or_at_once_take_it(name: str) -> None:
    assert getattr(load(env={f"CRISHIM_{name}": "0s"}), name.lower()) == 0


def test_a_sandbox_given_twice_is_refused():
    """`--sandboxes foo=/x,foo=/y`: the last one silently won."""
    with pytest.raises(ConfigError, match="sandboxes: 'foo' is given twice"):
        load(env={"CRISHIM_SANDBOXES": "foo=/run/netns/x,foo=/run/netns/y"})


def test_ctrl_c_while_the_commands_are_imported_is_exit_130_without_a_traceback(
        monkeypatch):
    """Building the parser imports every command's modules (~0.2 s); a Ctrl-C there was a
    KeyboardInterrupt traceback."""
    from crishim import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["version"]) == 130


def test_ctrl_c_while_crishim_cli_itself_is_imported_is_exit_130_without_a_traceback():
    """The console script imports crishim.cli (~40 ms: crishim.config and asyncio) before
    main() runs: a Ctrl-C then was a KeyboardInterrupt traceback."""
    code = ("import sys\n"
            "class Interrupted:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'crishim.config':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupted())\n"
            "from crishim.cli import main\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "")


@pytest.mark.parametrize("endpoint, why", [
    ("run/containerd/containerd.sock", "is not an absolute path or unix:///PATH"),
    ("unix:run/containerd.sock", "is not an absolute path or unix:///PATH"),
    ("localhost:1234", "is not an absolute path or unix:///PATH"),
    ("/run/crishim/crishim.sock", "is crishim's own socket"),
    ("unix:///run/crishim//crishim.sock", "is crishim's own socket"),
])
def test_an_upstream_endpoint_that_cannot_be_the_runtime_is_refused(endpoint: str,
                                                                     why: str) -> None:
    """A relative path was a DNS name to gRPC (every passed call UNAVAILABLE), and
    crishim's own socket passed each call to itself until its deadline."""
    with pytest.raises(ConfigError, match=f"^upstream_endpoint: '{endpoint}' {why}"):
        load(overrides={"upstream_endpoint": endpoint, "socket": "/run/crishim/crishim.sock"})


@pytest.mark.parametrize("endpoint", ["/run/containerd/containerd.sock",
                                      "unix:///run/containerd/containerd.sock",
                                      "unix:/run/containerd/containerd.sock", ""])
def test_an_upstream_endpoint_as_the_kubelet_names_one_is_taken(endpoint: str) -> None:
    assert load(overrides={"upstream_endpoint": endpoint}).upstream_endpoint == endpoint


@pytest.mark.parametrize("overrides, message", [
    ({"socket": "rel.sock"}, "socket: 'rel.sock' is not an absolute path"),
    ({"socket": ""}, "socket: '' is not an absolute path"),
    ({"stream_server_address": ""}, "stream_server_address: empty: give the address"),
    ({"max_tokens": "1_000"}, "max_tokens: '1_000' is not a valid int"),
    ({"max_tokens": " 10"}, "max_tokens: ' 10' is not a valid int"),
    ({"max_tokens": "١٠"}, "max_tokens: '١٠' is not a valid int"),
])
def test_values_python_would_take_and_crishim_should_not_are_refused(overrides, message):
    """A relative socket was bound at / (gRPC's unix://rel.sock) before the chmod failed
    with a traceback; an empty stream address listened everywhere, on two ports; int()
    took spaces, underscores and other scripts' digits."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        load(overrides=overrides, env={})


@pytest.mark.parametrize("toml, message", [
    ('socket = 5', "socket: 5 is not a string"),
    ('max_tokens = "10"', "max_tokens: '10' is not an integer"),
    ('max_tokens = true', "max_tokens: True is not an integer"),
    ('drain_timeout = true', "drain_timeout: True is not a duration"),
    ('upstream_version = "no"', "upstream_version: 'no' is not true or false"),
    ('error_policy = ["quiet"]', r"error_policy: \['quiet'\] is not a string"),
    ('sandboxes = 5', "sandboxes: 5 is not a table of id = path"),
])
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path, toml, message):
    """TOML has types: `socket = 5` bound /5 and `max_tokens = "10"` passed as 10."""
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=f"^config file {f}: {message}"):
        load(str(f), env={})


def test_toml_values_of_each_type_are_taken(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max_tokens = 7\nupstream_version = false\ndrain_timeout = "2s"\n'
                 'token_ttl = 30\nsandboxes = { a = "/run/netns/a" }\n'
                 'netns_dir = "/run/netns"\n')
    cfg = load(str(f), env={})
    assert (cfg.max_tokens, cfg.upstream_version, cfg.drain_timeout, cfg.token_ttl,
            cfg.sandboxes) == (7, False, 2.0, 30.0, {"a": "/run/netns/a"})


def test_version_and_dash_dash_version_print_the_same_line():
    """`crishim --version` said `crishim 0.1.0`, `crishim version` named the CRI API too."""
    import subprocess
    import sys

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "crishim", *args], capture_output=True,
                              text=True, timeout=60, check=True)
        return done.stdout

    line = run("version")
    assert line == run("--version")
    assert line.startswith("crishim ") and "runtime.v1" in line
