"""Settings: Go-style durations, addresses, the seed's CODER_* names, refusals with clear messages."""

import pytest

from coordinator.core.errors import ConfigError
from coordinator.core.settings import load_settings
from coordinator.core.values import parse_address, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("2s", 2.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5", 1.5), ("250us", 0.00025)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "2 s", "s2", "1x"])
def test_bad_durations(text):
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration(text, "COORDINATOR_REPLICA_HEARTBEAT")


def test_addresses():
    assert parse_address("*:80") == ("0.0.0.0", 80)
    assert parse_address(":3000") == ("0.0.0.0", 3000)
    assert parse_address("[::1]:3000") == ("::1", 3000)
    for bad in ("3000", "host:port", "h:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_seed_example_with_coder_names():
    s = load_settings(environ={
        "CODER_ADDRESS": "*:80",
        "CODER_DERP_SERVER_RELAY_URL": "http://10.0.0.1:80",
        "CODER_ACCESS_URL": "https://coder.big.corp",
        "CODER_REPLICA_HEARTBEAT": "500ms",
    })
    assert s.listen == ("0.0.0.0", 80)
    assert s.relay_url == "http://10.0.0.1:80" and s.access_url == "https://coder.big.corp"
    assert s.heartbeat == 0.5


def test_coordinator_names_win_and_flags_win_over_both():
    env = {"CODER_DERP_SERVER_REGION_ID": "1", "COORDINATOR_DERP_SERVER_REGION_ID": "2"}
    assert load_settings(environ=env).region_id == 2
    assert load_settings({"region_id": "3"}, environ=env).region_id == 3


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COORDINATOR_DERP_SERVER_RELAY_URL": "https://lb.corp", "COORDINATOR_ACCESS_URL": "https://lb.corp:443/"},
         "not the access URL"),
        ({"COORDINATOR_DERP_SERVER_RELAY_URL": "10.0.0.1:80"}, "absolute http"),
        ({"COORDINATOR_DERP_SERVER_RELAY_URL": "ftp://10.0.0.1"}, "absolute http"),
        ({"COORDINATOR_DERP_SERVER_REGION_ID": "eu"}, "not an integer"),
        ({"COORDINATOR_REPLICA_HEARTBEAT": "0s"}, "must be positive"),
        ({"COORDINATOR_TLS_CERT_FILE": "/nonexistent.pem"}, "must be given together"),
        ({"COORDINATOR_LOG_LEVEL": "loud"}, "COORDINATOR_LOG_LEVEL"),
    ],
)
def test_refusals_name_the_setting(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


# -- one declaration per setting, one line per bad setting ------------------------------------------

import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from coordinator.cli.main import main  # noqa: E402
from coordinator.core.settings import declared_settings, ensure_data_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "ab" * 32


def test_readme_settings_table_is_the_declared_settings():
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    documented = {flag: tuple(re.findall(r"`([A-Z_]+)`", envs)) for flag, envs in rows}
    declared = {f.metadata["flag"]: (f.metadata["env"], *f.metadata["aliases"]) for f in declared_settings()}
    assert documented == declared, "README.md's settings table and coordinator/core/settings.py's declarations differ"


def test_unknown_and_unsupported_variables_get_one_warning():
    s = load_settings(environ={"COORDINATOR_RELAY": "x", "CODER_DERP_SERVER_STUN_ADDRESSES": "disable", "CODER_TLS_ENABLE": "1",
                               "CODER_ACCESS_URL": "https://lb.corp", "COORDINATOR_WITH_NGINX": "1"})
    assert s.warnings == ["ignoring environment variables this project does not know: CODER_DERP_SERVER_STUN_ADDRESSES, "
                          "CODER_TLS_ENABLE, COORDINATOR_RELAY"]


def test_secrets_from_files_and_a_warning_for_secret_flags(tmp_path):
    (tmp_path / "mesh").write_text(KEY.upper() + "\n")
    (tmp_path / "token").write_text(" tok \n")
    s = load_settings({"mesh_key_file": str(tmp_path / "mesh")}, environ={"COORDINATOR_API_TOKEN_FILE": str(tmp_path / "token")})
    assert (s.mesh_key, s.api_token, s.warnings) == (KEY.upper(), "tok", [])
    s = load_settings({"mesh_key": KEY}, environ={})
    assert len(s.warnings) == 1 and "--mesh-key on the command line" in s.warnings[0] and "--mesh-key-file" in s.warnings[0]
    with pytest.raises(ConfigError, match="give --mesh-key or COORDINATOR_DERP_MESH_KEY_FILE, not both"):
        load_settings({"mesh_key": KEY}, environ={"COORDINATOR_DERP_MESH_KEY_FILE": str(tmp_path / "mesh")})
    with pytest.raises(ConfigError, match="^--api-token-file: cannot read"):
        load_settings({"api_token_file": str(tmp_path / "absent")}, environ={})


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ({"mesh_key": "short"}, {}, r"^--mesh-key: a mesh key is 64 hex characters, got 5"),
        ({}, {"CODER_DERP_MESH_KEY": "zz" * 32}, r"^CODER_DERP_MESH_KEY: a mesh key is 64 hex"),
        ({"relay_url": "http://[::1"}, {}, r"^--relay-url: 'http://\[::1' is not a valid URL"),
        ({}, {"CODER_DERP_SERVER_RELAY_URL": "http://h:99999"}, r"^CODER_DERP_SERVER_RELAY_URL: .* not a valid URL"),
        ({"address": "h:99999"}, {}, r"^--address: port 99999"),
        ({}, {"CODER_HTTP_ADDRESS": "nope"}, r"^CODER_HTTP_ADDRESS: "),
        ({"max_request_head": "64 parsecs"}, {}, r"^--max-request-head: '64 parsecs' is not a size"),
        ({"header_timeout": "0s"}, {}, r"^--header-timeout must be positive"),
    ],
)
def test_errors_name_what_the_operator_typed(overrides, env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides, environ=env)


def test_garbage_tls_pem_is_one_line(tmp_path):
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"^CODER_TLS_CERT_FILE / --tls-key-file: not a usable PEM"):
        load_settings({"tls_key_file": str(tmp_path / "key.pem")}, environ={"CODER_TLS_CERT_FILE": str(tmp_path / "cert.pem")})


def test_unusable_data_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="^--data-dir: .* exists and is not a directory"):
        ensure_data_dir(load_settings({"data_dir": str(tmp_path / "file")}, environ={}))
    with pytest.raises(ConfigError, match="^COORDINATOR_DATA_DIR: cannot create"):
        ensure_data_dir(load_settings(environ={"COORDINATOR_DATA_DIR": str(tmp_path / "file" / "sub")}))


def test_flags_are_not_abbreviable_and_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["server", "--relay", "http://10.0.0.1"])
    assert "unrecognized arguments: --relay" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["server", "--help"])
    out = capsys.readouterr().out
    assert "--db-wait" in out and "(default: 0s)" in out and "--pg-wait" not in out
    assert "(default: 64KiB)" in out.replace("\n", " ").replace("  ", " ") or "64KiB" in out


def one_line_failure(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**__import__("os").environ, **(env or {})})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_server_refusals_are_one_line_and_leave_nothing_running(tmp_path):
    assert "--relay-url: 'http://[::1' is not a valid URL" in one_line_failure("server", "--relay-url", "http://[::1")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        line = one_line_failure("server", "--data-dir", str(tmp_path), "--pg-url", "postgresql://x@127.0.0.1:1/x",
                                env={"CODER_ADDRESS": f"127.0.0.1:{port}"})
        assert line.startswith(f"coordinator: configuration error: CODER_ADDRESS 127.0.0.1:{port}: cannot listen")
    finally:
        busy.close()
    (tmp_path / "afile").write_text("")
    line = one_line_failure("server", "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "afile"),
                            "--pg-url", "postgresql://x@127.0.0.1:1/x")
    assert "--data-dir: " in line and "not a directory" in line


def test_a_setting_declared_without_its_flag_fails_at_once():
    from coordinator.core.settings import _setting

    with pytest.raises(TypeError, match="declare a setting as _setting"):
        _setting("COORDINATOR_NEW_THING", 1.0, kind="duration")
