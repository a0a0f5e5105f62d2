"""The satroute command line: serve's settings precedence, delegated subcommands, clear errors."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from proxy import cli
from proxy.store import Store
from support.read_only import make_read_only

LISTENING_SOCKETS = cli.listening_sockets


@pytest.fixture(autouse=True)
def no_port(monkeypatch):
    """serve's tests here fake uvicorn's run: they take no port (8000 may be another process's
    on this machine, and 10.1.2.3 is none of its addresses)."""
    monkeypatch.setattr(cli, "listening_sockets", lambda host, port: [])


def test_serve_flags_win_over_environment(monkeypatch, tmp_path):
    seen = {}

    def fake_run(server, sockets=None):  # uvicorn.Server.run: what it would serve, and where
        seen.update(host=server.config.host, port=server.config.port,
                    settings=server.config.app.state.services.settings)
        server.started = True

    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    monkeypatch.setenv("SATROUTE_PORT", "9100")
    monkeypatch.setenv("SATROUTE_HOST", "127.0.0.2")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setattr("uvicorn.Server.run", fake_run)
    assert cli.main(["serve", "--config", str(cfg), "--port", "9200"]) == 0
    assert seen["port"] == 9200 and seen["host"] == "127.0.0.2"
    assert seen["settings"].scorer == "constant" and seen["settings"].config == cfg


def test_serve_with_invalid_config_exits_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {modle: x}}\n")
    assert cli.main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model_list.0.litellm_params.model" in err and str(cfg) in err


def test_serve_with_a_directory_as_config_exits_2_in_one_line(tmp_path, capsys):
    """A Kubernetes ConfigMap mounted without subPath: the config path is its folder."""
    assert cli.main(["serve", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute: invalid configuration: ") and "is a directory" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("env, named", [({"SATROUTE_PORT": "abc"}, "SATROUTE_PORT"),
                                         ({"SATROUTE_SCORER": "foo"}, "SATROUTE_SCORER"),
                                         ({"SATROUTE_LOG_LEVEL": "verbose"}, "SATROUTE_LOG_LEVEL"),
                                         ({"SATROUTE_MAX_BODY_BYTES": "sk-secret-value-123"},
                                          "SATROUTE_MAX_BODY_BYTES"),
                                         # NaN compared false with every cost: it disabled the cap
                                         ({"SATROUTE_ONBOARDING_SPEND_CAP_USD": "nan"},
                                          "SATROUTE_ONBOARDING_SPEND_CAP_USD")])
def test_serve_with_an_invalid_setting_exits_2_in_one_line(monkeypatch, tmp_path, capsys, env, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **kw: pytest.fail("served with an invalid setting"))
    assert cli.main(["serve", "--config", str(tmp_path / "providers.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute: invalid settings: ") and named in err and err.count("\n") == 1
    assert "sk-secret" not in err  # a value is never echoed: it may be a key


def test_log_level_is_case_insensitive(monkeypatch):
    from proxy.settings import Settings

    monkeypatch.setenv("SATROUTE_LOG_LEVEL", "WARNING")
    assert Settings().log_level == "warning"


def test_a_variable_set_to_nothing_is_a_setting_left_unset(monkeypatch):
    """compose's `SATROUTE_SCORER_DEVICE=` (or an .env line with no value) means "not set": the
    scorer picks its device, the onboarding data its folder, the spend cap its default."""
    from proxy.settings import Settings

    for name in ("SCORER_DEVICE", "SCORER_CHECKPOINT", "ONBOARDING_DATA", "ONBOARDING_SPEND_CAP_USD", "PORT"):
        monkeypatch.setenv(f"SATROUTE_{name}", "")
    settings, defaults = Settings(), Settings.model_construct()
    assert settings.scorer_device is None and settings.scorer_checkpoint is None
    assert settings.onboarding_data is None
    assert (settings.onboarding_spend_cap_usd, settings.port) == (defaults.onboarding_spend_cap_usd, 8000)


@pytest.mark.parametrize("broken", ["a_file", "db_is_a_folder", "db_read_only"])
def test_serve_with_an_unusable_state_dir_exits_2_in_one_line(monkeypatch, tmp_path, capsys, broken):
    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    state = tmp_path / "state"
    if broken == "a_file":
        state.write_text("not a folder")
    elif broken == "db_is_a_folder":
        (state / "satroute.db").mkdir(parents=True)
    else:  # left by an earlier run as another user: serving would lose every write
        Store(state).close()
        make_read_only(monkeypatch, state / "satroute.db")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setenv("SATROUTE_STATE_DIR", str(state))
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **kw: pytest.fail("served without its state store"))
    assert cli.main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot open the state store in" in err and str(state) in err and "Traceback" not in err


def test_delegated_subcommand_runs_module(monkeypatch):
    mod = types.ModuleType("fake_training")
    mod.add_arguments = lambda p: p.add_argument("--epochs", type=int, default=1)
    mod.run = lambda args: args.epochs + 40
    monkeypatch.setitem(sys.modules, "fake_training", mod)
    monkeypatch.setitem(cli.DELEGATED, "train", ("fake_training", "train"))
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    assert cli.main(["train", "--epochs", "2"]) == 42


def test_missing_delegated_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "onboard", ("proxy.no_such_module", "onboard"))
    assert cli.main(["onboard"]) == 2
    assert "not available" in capsys.readouterr().err


def test_console_script_help_has_no_traceback():
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout and "onboard" in out.stdout
    with pytest.raises(SystemExit):
        cli.main([])


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"satroute {version('satroute')}"


@pytest.mark.parametrize("host, master, warned", [("0.0.0.0", None, True), ("::", None, True),
                                                  ("10.1.2.3", None, True), ("0.0.0.0", "mk-1", False),
                                                  ("127.0.0.1", None, False), ("localhost", None, False),
                                                  ("::1", None, False)])
def test_serve_warns_when_reachable_from_other_machines_without_a_master_key(monkeypatch, tmp_path, host,
                                                                            master, warned):
    import logging

    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setenv("SATROUTE_LOG_FORMAT", "text")
    if master:
        monkeypatch.setenv("SATROUTE_MASTER_KEY", master)
    else:
        monkeypatch.delenv("SATROUTE_MASTER_KEY", raising=False)
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: setattr(server, "started", True))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("satroute.app").addHandler(handler)
    try:
        assert cli.main(["serve", "--config", str(cfg), "--host", host]) == 0
    finally:
        logging.getLogger("satroute.app").removeHandler(handler)
    said = [r.getMessage() for r in records if "without SATROUTE_MASTER_KEY" in r.getMessage()]
    assert bool(said) is warned


def test_start_up_lines_are_redacted_for_the_configuration_s_secrets(monkeypatch, tmp_path, capsys):
    """The registry is built, and says why a model is unavailable, before the log's redactor is
    handed the configuration's secrets: a value read with os.environ/ (a token in an api_base's
    path) was written as it is at start-up, and redacted only after an edit."""
    token = "tok_5e6f7a8b9c0d1e2f3a4b"
    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n"
                   "  - {model_name: gw, litellm_params: {model: openai/b, api_base: os.environ/GW_BASE}}\n")
    monkeypatch.setenv("GW_BASE", f"vllm.internal:8000/{token}/v1")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setenv("SATROUTE_MASTER_KEY", "mk-startup-0123")
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: setattr(server, "started", True))
    assert cli.main(["serve", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "model gw unavailable: " in err and "[redacted]" in err
    assert token not in err


def test_a_bad_flag_value_is_named_by_its_flag_not_by_a_variable_nobody_set(tmp_path, capsys):
    assert cli.main(["serve", "--config", str(tmp_path / "providers.yaml"), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port: " in err and "SATROUTE_PORT" not in err
    assert cli.main(["onboard", "m", "--config", str(tmp_path / "providers.yaml"), "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert "--concurrency: " in err and "SATROUTE_ONBOARDING_CONCURRENCY" not in err




@pytest.fixture
def settings_log():
    """The records the ``satroute.settings`` logger gives while the test runs."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("satroute.settings")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _one_model(tmp_path, key_ref: str = "") -> str:
    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a%s}}\n"
                   % (f", api_key: os.environ/{key_ref}" if key_ref else ""))
    return str(cfg)


def test_serve_warns_once_for_each_satroute_variable_nothing_reads(monkeypatch, tmp_path, settings_log):
    """A misspelt setting was ignored without a word, and its default ran (onboarding on, a 20 USD
    cap): each is named, with the setting it is closest to. Variables read elsewhere are not."""
    env = {"SATROUTE_ONBOARD": "false", "SATROUTE_ONBOARDING_SPEND_CAP": "1",
           "SATROUTE_SCORER_DEVISE": "cpu", "SATROUTE_WHATEVER": "sk-secret-value-123",
           "satroute_data_dir": "/data",  # read by os.environ, in this case only
           # read elsewhere, a setting in another case, a variable providers.yaml names
           "SATROUTE_DATA_DIR": "/data", "SATROUTE_CACHE_DIR": "/cache", "satroute_log_level": "info",
           "SATROUTE_OPENAI_KEY": "sk-provider-key-123456", "SATROUTE_SCORER": "constant"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: setattr(server, "started", True))
    assert cli.main(["serve", "--config", _one_model(tmp_path, "SATROUTE_OPENAI_KEY")]) == 0
    said = [r.getMessage() for r in settings_log]
    assert {r.levelname for r in settings_log} == {"WARNING"}
    assert said == [
        "environment variable SATROUTE_ONBOARD is not a setting satroute reads; did you mean SATROUTE_ONBOARDING?",
        "environment variable SATROUTE_ONBOARDING_SPEND_CAP is not a setting satroute reads; did you mean "
        "SATROUTE_ONBOARDING_SPEND_CAP_USD?",
        "environment variable SATROUTE_SCORER_DEVISE is not a setting satroute reads; did you mean "
        "SATROUTE_SCORER_DEVICE?",
        "environment variable SATROUTE_WHATEVER is not a setting satroute reads; it is ignored",
        "environment variable satroute_data_dir is not a setting satroute reads; did you mean SATROUTE_DATA_DIR?",
    ]


@pytest.mark.parametrize("typed, meant", [("SATROUTE_PROT", "SATROUTE_PORT"), ("SATROUTE_HOTS", "SATROUTE_HOST"),
                                          ("SATROUTE_HSOT", "SATROUTE_HOST"), ("SATROUTE_POT", "SATROUTE_PORT"),
                                          ("SATROUTE_CONIFG", "SATROUTE_CONFIG"), ("SATROUTE_FOO", None)])
def test_a_short_setting_s_slip_is_named_too(typed, meant):
    """Two letters swapped in a four-letter name is no closer than 0.75 by difflib's ratio:
    SATROUTE_PROT was "ignored", with no word of SATROUTE_PORT."""
    from proxy.settings import unknown_variables

    assert unknown_variables({typed: "1"}) == [(typed, meant)]


@pytest.mark.parametrize("name", ["SATROUTE_MASTERKEY", "SATROUTE_MASTER_KY", "satroute_masterkey",
                                  "SATROUTE_MASTER_KEY_FILE"])
def test_serve_refuses_to_start_without_the_master_key_it_was_given_under_a_misspelt_name(
        monkeypatch, tmp_path, capsys, name):
    """The admin meant every request to need a key: a warning would leave the proxy open."""
    monkeypatch.delenv("SATROUTE_MASTER_KEY", raising=False)
    monkeypatch.setenv(name, "s3cret-admin-key")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **kw: pytest.fail("served without the master key"))
    assert cli.main(["serve", "--config", _one_model(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"satroute: {name} is not a setting satroute reads; did you mean "
                          "SATROUTE_MASTER_KEY? Not starting") and err.count("\n") == 1, err
    assert "s3cret" not in err


@pytest.mark.parametrize("key", ["s3cr3t-master-kéy", "mk-\u2013dash", "ключ-0123",
                                 "line-one\nline-two", "mk\x7fdel"])
def test_serve_refuses_a_master_key_clients_cannot_send(monkeypatch, tmp_path, capsys, key):
    """A key with a character beyond ASCII started, and then httpx and the openai SDKs raised
    UnicodeEncodeError before sending a request, and clients that send Latin-1 got 401; one with a
    line break inside (a secret file of two lines) started, and no client could send it."""
    monkeypatch.setenv("SATROUTE_MASTER_KEY", key)
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **kw: pytest.fail("served with a key no SDK can send"))
    assert cli.main(["serve", "--config", _one_model(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute: invalid settings: SATROUTE_MASTER_KEY: the key must be ASCII")
    assert err.count("\n") == 1 and key not in err and "Value error" not in err


def test_a_master_key_with_a_tab_inside_is_taken(monkeypatch, tmp_path):
    """A header value may carry a tab (RFC 9110), and httpx and the SDKs send one."""
    from proxy.settings import Settings

    monkeypatch.setenv("SATROUTE_MASTER_KEY", "mk\ttabbed\n")
    assert Settings().master_key_value() == "mk\ttabbed"


@pytest.mark.parametrize("env", [{"SATROUTE_MASTERKEY": ""},  # set to nothing, as the key would be
                                 {"SATROUTE_MASTERKEY": "old-key", "SATROUTE_MASTER_KEY": "mk-1"}])
def test_a_misspelt_master_key_beside_no_key_meant_or_the_key_itself_is_a_warning(
        monkeypatch, tmp_path, settings_log, env):
    monkeypatch.delenv("SATROUTE_MASTER_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: setattr(server, "started", True))
    assert cli.main(["serve", "--config", _one_model(tmp_path)]) == 0
    assert [r.getMessage() for r in settings_log] == [
        "environment variable SATROUTE_MASTERKEY is not a setting satroute reads; did you mean "
        "SATROUTE_MASTER_KEY?"]


def test_onboard_warns_for_each_satroute_variable_nothing_reads(monkeypatch, tmp_path, capsys, settings_log):
    """`satroute onboard` reads the same settings (the spend cap, the data folder); it serves
    nothing, so a misspelt master key is a warning there."""
    monkeypatch.setenv("SATROUTE_ONBOARDING_SPEND_CAP", "1")
    monkeypatch.setenv("SATROUTE_MASTERKEY", "s3cret-admin-key")
    monkeypatch.setenv("SATROUTE_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["onboard", "nope", "--config", _one_model(tmp_path)]) == 2  # no such model
    assert "no model 'nope'" in capsys.readouterr().err
    assert [r.getMessage() for r in settings_log] == [
        "environment variable SATROUTE_MASTERKEY is not a setting satroute reads; did you mean "
        "SATROUTE_MASTER_KEY?",
        "environment variable SATROUTE_ONBOARDING_SPEND_CAP is not a setting satroute reads; did you mean "
        "SATROUTE_ONBOARDING_SPEND_CAP_USD?"]


def test_every_satroute_variable_the_project_reads_or_documents_is_known():
    """``READ_ELSEWHERE`` is the one list of the variables read outside Settings: one read with
    os.environ, set by the image or compose, or in the settings table, is never warned about."""
    import re
    from pathlib import Path

    from proxy.settings import unknown_variables

    repo = Path(__file__).resolve().parents[2]
    names = set()
    for folder in ("proxy", "scorer", "bench", "tests"):
        for file in (repo / folder).rglob("*.py"):
            names |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](SATROUTE_\w+)""", file.read_text()))
    for file in ("Dockerfile", "docker-compose.yml", "docker-compose.cpu.yml", "pyproject.toml"):
        names |= set(re.findall(r"SATROUTE_\w+", (repo / file).read_text()))
    table = (repo / "docs" / "configuration.md").read_text()
    names |= set(re.findall(r"^\| `(SATROUTE_\w+)`", table, re.MULTILINE))
    assert {"SATROUTE_DATA_DIR", "SATROUTE_CACHE_DIR", "SATROUTE_SLOW_TESTS", "SATROUTE_PORT"} <= names
    assert unknown_variables(dict.fromkeys(names, "x")) == []


def test_a_sighup_while_serve_starts_waits_for_the_event_loop_and_none_ends_the_process():
    """From the app's building on (the scorer may take a while to load), a SIGHUP is caught: one
    before the event loop runs is acted on once it does, one after it has closed is dropped, and
    the handler before is back once serve returns."""
    import asyncio
    import os
    import signal

    checks = []
    before = signal.getsignal(signal.SIGHUP)
    with cli.Hangups() as hangups:
        os.kill(os.getpid(), signal.SIGHUP)  # the app being built: nothing runs it yet

        async def serving():
            hangups.attach(asyncio.get_running_loop(), lambda: checks.append("checked"))
            await asyncio.sleep(0.05)
            assert checks == ["checked"]
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if len(checks) == 2:
                    break
                await asyncio.sleep(0.01)

        asyncio.run(serving())
        assert checks == ["checked", "checked"]
        os.kill(os.getpid(), signal.SIGHUP)  # the loop has closed: dropped, no error
    assert checks == ["checked", "checked"]
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_sighup_during_a_request_is_checked_out_of_that_request_s_log_context():
    """The signal interrupts whatever runs, a request's task included: its request id was on the
    SIGHUP lines, which belong to no request."""
    import asyncio
    import os
    import signal

    from proxy.logs import _REQUEST_ID

    seen = []
    with cli.Hangups() as hangups:
        async def serving():
            hangups.attach(asyncio.get_running_loop(), lambda: seen.append(_REQUEST_ID.get()))

            async def a_request():
                _REQUEST_ID.set("req_of_a_client")
                os.kill(os.getpid(), signal.SIGHUP)  # handled here, in the request's task
                await asyncio.sleep(0.05)

            await asyncio.create_task(a_request())

        asyncio.run(serving())
    assert seen == [None]


def test_serve_takes_its_port_as_uvicorn_would_and_holds_it_before_the_app_starts():
    """Listening, not only bound (a bound socket does not keep a second process off the port on
    Linux), with SO_REUSEADDR (a restart takes the port of connections in TIME_WAIT), and not
    handed down to the local model servers the proxy starts."""
    import socket

    sockets = LISTENING_SOCKETS("127.0.0.1", 0)
    try:
        [sock] = sockets
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert not sock.get_inheritable()
        with pytest.raises(OSError) as taken:
            LISTENING_SOCKETS("127.0.0.1", sock.getsockname()[1])
        assert "satroute: cannot listen on 127.0.0.1:%d: Address already in use; another process listens there" % (
            sock.getsockname()[1]) in cli._listen_error("127.0.0.1", sock.getsockname()[1], taken.value)
    finally:
        for sock in sockets:
            sock.close()


def test_serve_takes_an_ipv6_port_for_ipv6_only():
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        sockets = LISTENING_SOCKETS("::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        [sock] = sockets
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert cli._listen_error("::1", 8000, OSError(98, "Address already in use")).startswith(
            "satroute: cannot listen on [::1]:8000: Address already in use")
    finally:
        for sock in sockets:
            sock.close()


def test_an_address_of_the_name_the_machine_cannot_bind_is_skipped_unless_it_is_the_only_one(monkeypatch):
    """`localhost` resolving to ::1 as well where IPv6 is turned off (Docker's default): the proxy
    listens on 127.0.0.1, as Python 3.13's event loop does, and names the address if none is left."""
    import errno
    import socket

    resolved = socket.getaddrinfo

    def names(addresses):
        return lambda host, port, *args: [info for a in addresses for info in resolved(a, port, *args)]

    monkeypatch.setattr(socket, "getaddrinfo", names(["127.0.0.1", "192.0.2.1"]))  # the second: no address of ours
    [sock] = LISTENING_SOCKETS("localhost", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    monkeypatch.setattr(socket, "getaddrinfo", names(["192.0.2.1"]))
    with pytest.raises(OSError) as failed:
        LISTENING_SOCKETS("localhost", 8123)
    assert failed.value.errno == errno.EADDRNOTAVAIL
    assert cli._listen_error("localhost", 8123, failed.value).startswith(
        "satroute: cannot listen on localhost:8123 (192.0.2.1:8123): ")


def test_serve_on_a_port_in_use_exits_2_in_one_line_and_builds_nothing(monkeypatch, tmp_path, capsys):
    import socket

    import proxy.app

    monkeypatch.setattr(cli, "listening_sockets", LISTENING_SOCKETS)
    monkeypatch.setattr(proxy.app, "create_app", lambda *a, **kw: pytest.fail("built the app on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--config", _one_model(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"satroute: cannot listen on 127.0.0.1:{port}: Address already in use; another process listens there (a "
        "satroute serve already running?): stop it, or choose another port (--port, SATROUTE_PORT)\n")


def test_onboard_s_error_about_an_unavailable_model_is_one_line(tmp_path):
    """providers.yaml's other unavailable models are not this command's concern: their warnings
    came before its one-line error, one per model."""
    import os
    from pathlib import Path

    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n" + "".join(
        f"  - {{model_name: {name}, litellm_params: {{model: openai/{name}, api_key: os.environ/SATROUTE_TEST_UNSET}}}}\n"
        for name in ("one", "two", "three")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATROUTE_")}

    def onboard(model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "proxy.cli", "onboard", model, "--config", str(cfg),
                               "--state-dir", str(tmp_path / "state")], cwd=Path(cli.__file__).parents[1],
                              env=env, capture_output=True, text=True, timeout=60)

    done = onboard("nosuch")
    assert (done.returncode, done.stderr) == (2, f"satroute onboard: no model 'nosuch' in {cfg}\n")
    done = onboard("two")
    why = "litellm_params.api_key references unset environment variable SATROUTE_TEST_UNSET"
    assert (done.returncode, done.stderr) == (2, f"satroute onboard: two is unavailable: {why}\n")


def test_a_state_store_that_cannot_be_opened_is_no_invalid_configuration(tmp_path, monkeypatch, capsys):
    """A full disk or a read-only volume was told as "invalid configuration: ... disk I/O error"
    or "unable to open database file": the line says which, where it can be told."""
    import collections
    import sqlite3

    from proxy import store as store_module

    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    state = tmp_path / "state"
    state.mkdir()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    full = store_module.unopenable(state, sqlite3.OperationalError("database or disk is full"))
    assert full == f"cannot open the state store in {state}: database or disk is full (its filesystem is full: 4096 bytes free)"
    monkeypatch.setattr(store_module.os, "access", lambda p, mode: False)
    assert "(the folder cannot be written: a read-only volume, or another user's)" in store_module.unopenable(
        state, sqlite3.OperationalError("unable to open database file"))
    state.rmdir()
    state.write_text("not a folder")
    monkeypatch.setenv("SATROUTE_SCORER", "constant")
    monkeypatch.setenv("SATROUTE_STATE_DIR", str(state))
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **kw: pytest.fail("served without its state store"))
    assert cli.main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute: cannot open the state store in") and "invalid configuration" not in err
