"""The DERP test vectors of docs/derp-protocol.md ("Test vectors"), byte for byte."""

import json

import pytest
from nacl.public import Box

from _relay import codec
from _relay.relay import RelayServer, address18
from coordinator.core.keys import NodeKey, clamp, load_or_create_server_key, short
from coordinator.relay.handshake import (
    SERVER_INFO_JSON,
    HandshakeError,
    ServerHandshake,
    client_info_payload,
    mesh_keys_equal,
    open_server_info,
    parse_server_key,
)

SERVER_PRIV = "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60"
SERVER_PUB = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
CLIENT_PRIV = "4042424242424242424242424242424242424242424242424242424242424242"
CLIENT_PUB = "132c442be010fbd57e72603328aa76e71fccc1503aae219327d14d9c9993f472"
SERVER_KEY_FRAME = "010000002844455250f09f9491" + SERVER_PUB
CLIENT_INFO_FRAME = (
    "0200000068" + CLIENT_PUB + "000102030405060708090a0b0c0d0e0f1011121314151617"
    "7ae115723c7cecfbfde415ed07e29e64fd0de278283edcf6c17f0d22d516bd345aa777d9e12f1489a81227eb6f45082f"
)
SERVER_INFO_FRAME = (
    "0300000035fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0efeeedecebeae9e8"
    "144b318e24d9089f2c0d0c948e54966f213707bc0cddbec76338bd832d"
)

server = NodeKey.from_private(bytes.fromhex(SERVER_PRIV))
client = NodeKey.from_private(bytes.fromhex(CLIENT_PRIV))


def test_keys_and_clamping():
    assert server.public.hex() == SERVER_PUB
    assert client.public.hex() == CLIENT_PUB
    assert clamp(bytes(range(1, 33))).hex() == SERVER_PRIV
    assert clamp(b"\x42" * 32).hex() == CLIENT_PRIV
    assert short(server.public) == "[B6N8v]"
    assert short(client.public) == "[EyxEK]"


def test_server_key_frame():
    relay = RelayServer(server.public, None)
    assert relay.server_key_frame.hex() == SERVER_KEY_FRAME
    assert parse_server_key(relay.server_key_frame[5:]) == server.public
    with pytest.raises(HandshakeError):
        parse_server_key(b"DERP!!!!" + server.public)


def test_client_info_frame_and_server_side_open():
    payload = client_info_payload(client, server.public, {"version": 2, "CanAckPings": True}, nonce=bytes(range(24)))
    assert codec.frame(codec.CLIENT_INFO, payload).hex() == CLIENT_INFO_FRAME
    key, info, can_mesh, server_info = ServerHandshake(server)(bytes.fromhex(CLIENT_INFO_FRAME)[5:])
    assert key == client.public
    assert info == {"version": 2, "canackpings": True}
    assert can_mesh is False
    assert open_server_info(client, server.public, server_info) == {"version": 2}


def test_server_info_frame():
    nonce = bytes(0xFF - i for i in range(24))
    sealed = Box(server.nacl, client.nacl.public_key).encrypt(SERVER_INFO_JSON, nonce)
    assert codec.frame(codec.SERVER_INFO, bytes(sealed)).hex() == SERVER_INFO_FRAME
    assert Box(server.nacl, client.nacl.public_key).shared_key().hex() == (
        "168df14ec382f9bc09f48814a1a8cda43b8630dbd580ea8497117b35c586d0e8"
    )


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (codec.header(codec.SEND_PACKET, 32 + 1200), "04000004d0"),
        (codec.header(codec.SEND_PACKET, 32 + 65536), "0400010020"),
        (codec.header(codec.RECV_PACKET, 32 + 1200), "05000004d0"),
        (codec.header(codec.FORWARD_PACKET, 64 + 1200), "0a000004f0"),
        (codec.header(codec.SEND_PACKET, 1024), "0400000400"),
        (codec.send_packet(server.public, b"hello"), "0400000025" + SERVER_PUB + "68656c6c6f"),
        (codec.frame(codec.RECV_PACKET, client.public, b"hello"), "0500000025" + CLIENT_PUB + "68656c6c6f"),
        (codec.frame(codec.KEEP_ALIVE), "0600000000"),
        (codec.frame(codec.NOTE_PREFERRED, b"\x01"), "070000000101"),
        (codec.frame(codec.PING, bytes(range(1, 9))), "12000000080102030405060708"),
        (codec.frame(codec.PONG, bytes(range(1, 9))), "13000000080102030405060708"),
        (codec.frame(codec.WATCH_CONNS), "1000000000"),
        (codec.frame(codec.CLOSE_PEER, client.public), "1100000020" + CLIENT_PUB),
        (codec.frame(codec.PEER_GONE, client.public, b"\x01"), "0800000021" + CLIENT_PUB + "01"),
        (
            codec.frame(codec.PEER_PRESENT, client.public, address18("192.0.2.10", 41641), b"\x01"),
            "0900000033" + CLIENT_PUB + "00000000000000000000ffffc000020aa2a901",
        ),
        (codec.frame(codec.RESTARTING, (1000).to_bytes(4, "big"), (5000).to_bytes(4, "big")), "1500000008000003e800001388"),
        (codec.frame(codec.HEALTH, b"dup"), "1400000003647570"),
    ],
)
def test_frame_vectors(encoded, expected):
    assert encoded.hex() == expected


def test_constants():
    assert codec.MAGIC.hex() == "44455250f09f9491"
    assert codec.DISCO_MAGIC.hex() == "5453f09f92ac"
    assert (codec.FRAME_HEADER_LEN, codec.KEY_LEN, codec.MAX_PACKET_SIZE, codec.PROTOCOL_VERSION) == (5, 32, 65536, 2)
    assert codec.is_disco(codec.DISCO_MAGIC + bytes(56))
    assert not codec.is_disco(codec.DISCO_MAGIC + bytes(55))


def test_frame_reader_split_and_coalesced():
    stream = bytes.fromhex(SERVER_KEY_FRAME + SERVER_INFO_FRAME) + codec.frame(codec.KEEP_ALIVE)
    whole = codec.FrameReader().feed(stream)
    assert [t for t, _ in whole] == [codec.SERVER_KEY, codec.SERVER_INFO, codec.KEEP_ALIVE]
    reader = codec.FrameReader()
    split = []
    for i in range(len(stream)):
        split += reader.feed(stream[i : i + 1])
    assert split == whole
    assert reader.buffered == 0


def test_frame_reader_refuses_oversized_frame():
    with pytest.raises(codec.FrameError, match="exceeds"):
        codec.FrameReader().feed(codec.header(codec.RECV_PACKET, (1 << 20) + 1))


def test_send_packet_limits():
    codec.send_packet(client.public, bytes(65536))
    with pytest.raises(codec.FrameError):
        codec.send_packet(client.public, bytes(65537))


def test_server_key_file_is_derper_format(tmp_path):
    path = tmp_path / "derper.key"
    path.write_text(json.dumps({"PrivateKey": "privkey:" + SERVER_PRIV}))
    assert load_or_create_server_key(path).public.hex() == SERVER_PUB
    fresh = load_or_create_server_key(tmp_path / "new" / "derper.key")
    stored = json.loads((tmp_path / "new" / "derper.key").read_text())
    assert stored["PrivateKey"] == "privkey:" + fresh.private.hex()
    assert (tmp_path / "new" / "derper.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_server_key(tmp_path / "new" / "derper.key") == fresh


def test_mesh_key_compare():
    key = "ab" * 32
    assert mesh_keys_equal(key.upper(), key)
    assert mesh_keys_equal(" " + key + "\n", key)
    assert not mesh_keys_equal("cd" * 32, key)
    assert not mesh_keys_equal("test-key", "test-key")  # not 64 hex characters: never a mesh key
    assert not mesh_keys_equal(key, "zz" * 32)


@pytest.mark.parametrize(
    "bad_key",
    [bytes(32), bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000")],
    ids=["zero", "low-order"],
)
def test_zero_and_low_order_client_keys_refused(bad_key):
    payload = bad_key + bytes(24 + 16 + 2)
    with pytest.raises(HandshakeError, match="client key"):
        ServerHandshake(server)(payload)
