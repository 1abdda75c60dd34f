"""The peer coordinator's wire protocol (coordinator/cluster/tailnet/messages.py): what is accepted and refused."""

import json
import uuid

import pytest

from coordinator.cluster.tailnet import messages as m

ME = uuid.uuid4()
OTHER = uuid.uuid4()


def test_requests_round_trip():
    for request in (m.Update({"key": "nodekey:ab", "seq": 3}), m.AddTunnel(OTHER), m.RemoveTunnel(OTHER),
                    m.ReadyForHandshake(OTHER), m.Disconnect()):
        assert m.parse_request(m.encode_request(request), ME) == request


def test_responses_round_trip():
    for response in (m.PeerUpdate(OTHER, m.NODE, {"key": "k"}), m.PeerUpdate(OTHER, m.LOST),
                     m.PeerUpdate(OTHER, m.DISCONNECTED), m.PeerUpdate(OTHER, m.READY_FOR_HANDSHAKE),
                     m.Error("coordinator unhealthy")):
        assert m.parse_response(m.encode_response(response)) == response
    frame = json.loads(m.encode_peer_update(OTHER, m.LOST))
    assert frame == {"type": "peer_update", "peer": str(OTHER), "kind": "lost"}


@pytest.mark.parametrize(("frame", "reason"), [
    ("not json", "not_json"),
    ("[1, 2]", "not_object"),
    (b'{"type": "update", "node": {}}', "binary_frame"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"node": {}}', "unknown_type"),
    ('{"type": "update", "node": [1]}', "bad_node"),
    (json.dumps({"type": "update", "node": {"pad": "x" * m.MAX_NODE_BYTES}}), "node_too_large"),
    ('{"type": "add_tunnel", "peer": "not-a-uuid"}', "bad_uuid"),
    ('{"type": "add_tunnel", "peer": 7}', "bad_uuid"),
    (json.dumps({"type": "add_tunnel", "peer": str(ME)}), "self_tunnel"),
    (json.dumps({"type": "ready_for_handshake", "peer": str(ME)}), "self_tunnel"),
    ("{" + " " * m.MAX_MESSAGE_BYTES + "}", "message_too_large"),
])
def test_bad_requests_are_refused_with_a_reason(frame, reason):
    with pytest.raises(m.ProtocolError) as info:
        m.parse_request(frame, ME)
    assert info.value.reason == reason
    assert "\n" not in str(info.value) and len(str(info.value)) <= m.MAX_ERROR_CHARS


def test_node_at_the_limit_is_accepted():
    pad = m.MAX_NODE_BYTES - len(m.json_text({"p": ""}).encode())
    node = {"p": "x" * pad}
    assert m.parse_request(m.encode_request(m.Update(node)), ME) == m.Update(node)


def test_error_messages_are_one_line():
    frame = json.loads(m.encode_error("first\nsecond " + "x" * 1000))
    assert "\n" not in frame["message"] and len(frame["message"]) <= m.MAX_ERROR_CHARS


def test_tailnet_settings_token_file_and_budget(tmp_path):
    from coordinator.core.errors import ConfigError
    from coordinator.core.settings import load_settings

    token = tmp_path / "token"
    token.write_text("  s3cret\n")
    settings = load_settings(environ={"COORDINATOR_TAILNET_TOKEN_FILE": str(token)})
    assert settings.tailnet_token == "s3cret"
    with pytest.raises(ConfigError, match="COORDINATOR_TAILNET_TOKEN or COORDINATOR_TAILNET_TOKEN_FILE"):
        load_settings(environ={"COORDINATOR_TAILNET_TOKEN": "x", "COORDINATOR_TAILNET_TOKEN_FILE": str(token)})
    with pytest.raises(ConfigError, match="--tailnet-max-peers must not be negative"):
        load_settings({"tailnet_max_peers": "-1"}, environ={})
    flagged = load_settings({"tailnet_token": "x"}, environ={})
    assert any("--tailnet-token-file" in w for w in flagged.warnings)  # secrets on the command line
