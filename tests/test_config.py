"""Settings: Go-style durations, addresses, the seed's CODER_* names, refusals with clear messages."""

import pytest

from coordinator.config import ConfigError, load_settings, parse_address, parse_duration


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
