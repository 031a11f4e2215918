"""Compressed calls from grpcio: gzip and deflate requests, unary and streaming, on both
services, set per call and per channel; responses compressed only by a server started with
--response-compression, and only for a client that accepts the algorithm."""

import grpc
import pytest

import services
from helpers import (CALL_TIMEOUT, COMPRESSIBLE, kinds, process_request, run_session, segments,
                     start, finish, talk, unique)
from listen.v1 import listen_pb2
from listen.v1 import listen_pb2_grpc
from pusher.v1 import pusher_pb2_grpc
from relay import ByteCounter

ALGORITHMS = pytest.mark.parametrize(
    "algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
# Where the compression is asked for: on each call, or as the channel's default.
HOW = pytest.mark.parametrize("how", ["per_call", "channel"])


def stubs_for(addr, algorithm, how, stub_class):
    """A stub and the per-call keyword arguments that compress its requests with `algorithm`."""
    if how == "channel":
        channel = services.channel(addr, compression=algorithm)
        return channel, stub_class(channel), {}
    channel = services.channel(addr)
    return channel, stub_class(channel), {"compression": algorithm}


@ALGORITHMS
@HOW
def test_listen_unary_calls(listen, algorithm, how):
    channel, stub, compress = stubs_for(listen.addr, algorithm, how, listen_pb2_grpc.ListenStub)
    with channel:
        uid = unique("compressed")
        submitted = stub.SubmitConversation(talk(uid, COMPRESSIBLE, "I will call the bank."),
                                            timeout=CALL_TIMEOUT, **compress)
        assert submitted.status == listen_pb2.CONVERSATION_STATUS_PROCESSING
        got = stub.GetConversation(listen_pb2.GetConversationRequest(conversation_id=submitted.conversation_id),
                                   timeout=CALL_TIMEOUT, **compress)
        assert got.uid == uid
        assert [s.text for s in got.segments] == [COMPRESSIBLE, "I will call the bank."]
        listed = stub.ListConversations(listen_pb2.ListConversationsRequest(uid=uid), timeout=CALL_TIMEOUT, **compress)
        assert [c.id for c in listed.conversations] == [submitted.conversation_id]


@ALGORITHMS
@HOW
def test_pusher_process(pusher, algorithm, how):
    channel, stub, compress = stubs_for(pusher.addr, algorithm, how, pusher_pb2_grpc.PusherStub)
    with channel:
        conversation_id = unique("compressed")
        ack = stub.Process(process_request(conversation_id, COMPRESSIBLE, "Remember to call the client."),
                           timeout=CALL_TIMEOUT, **compress)
        assert ack.conversation_id == conversation_id
        assert ack.WhichOneof("outcome") == "processed", ack
        assert ack.processed.structured.action_items, ack


@ALGORITHMS
@HOW
def test_listen_session(listen, algorithm, how):
    channel, stub, compress = stubs_for(listen.addr, algorithm, how, listen_pb2_grpc.ListenStub)
    with channel:
        events = run_session(stub, [start(unique("compressed")), segments(COMPRESSIBLE, "I will book the venue."),
                                    finish()], **compress)
    seen = kinds(events)
    assert "segments_stored" in seen, seen
    assert seen[-1] == "conversation_processed", seen


# Response compression: a conversation of about 200 KiB of repetitive text, read back through a
# relay that counts the bytes on the wire.
BIG_TEXTS = [COMPRESSIBLE] * 50
BIG_BYTES = sum(len(t) for t in BIG_TEXTS)


def response_bytes(addr, conversation_id, options=()):
    """Bytes the server sent for one GetConversation (FULL), and the conversation."""
    with ByteCounter(addr) as relay, services.channel(relay.addr, options=list(options)) as channel:
        stub = listen_pb2_grpc.ListenStub(channel)
        # Connect first, so the count is the call alone (and the HTTP/2 frames around it).
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        relay.reset()
        got = stub.GetConversation(listen_pb2.GetConversationRequest(conversation_id=conversation_id),
                                   timeout=CALL_TIMEOUT)
        return relay.to_client, got


def submit_big(stub):
    return stub.SubmitConversation(talk(unique("big"), *BIG_TEXTS), timeout=CALL_TIMEOUT).conversation_id


@pytest.fixture(scope="module")
def compressing_listen(launch, pusher):
    """A listen-svc started with --response-compression (gzip)."""
    return launch("listen", pusher, services.flag_with_value("listen-svc", "--response-compression", "gzip"))


def test_responses_are_not_compressed_by_default(listen, listen_stub):
    sent, got = response_bytes(listen.addr, submit_big(listen_stub))
    assert len(got.segments) == len(BIG_TEXTS)
    assert sent > BIG_BYTES, f"{sent} bytes on the wire for {BIG_BYTES} bytes of text"


def test_response_compression_for_a_client_that_accepts_gzip(compressing_listen):
    with services.channel(compressing_listen.addr) as channel:
        conversation_id = submit_big(listen_pb2_grpc.ListenStub(channel))
    # grpcio's default grpc-accept-encoding is "identity, deflate, gzip".
    sent, got = response_bytes(compressing_listen.addr, conversation_id)
    assert [s.text for s in got.segments] == BIG_TEXTS
    assert sent < BIG_BYTES / 4, f"{sent} bytes on the wire for {BIG_BYTES} bytes of text: not compressed"


def test_response_compression_spares_a_client_that_accepts_only_identity(compressing_listen):
    with services.channel(compressing_listen.addr) as channel:
        conversation_id = submit_big(listen_pb2_grpc.ListenStub(channel))
    # Bit 0 alone: grpcio then sends "grpc-accept-encoding: identity", and fails any call whose
    # response comes compressed ("Compression algorithm not supported").
    identity_only = [("grpc.compression_enabled_algorithms_bitset", 1)]
    sent, got = response_bytes(compressing_listen.addr, conversation_id, identity_only)
    assert [s.text for s in got.segments] == BIG_TEXTS
    assert sent > BIG_BYTES, f"{sent} bytes on the wire for {BIG_BYTES} bytes of text"


@pytest.fixture(scope="module")
def compressing_pusher(launch):
    """A pusher-svc started with --response-compression (gzip)."""
    return launch("pusher", services.flag_with_value("pusher-svc", "--response-compression", "gzip"))


@pytest.mark.parametrize("options", [[], [("grpc.compression_enabled_algorithms_bitset", 1)]],
                         ids=["accepts_gzip", "accepts_only_identity"])
def test_compressing_pusher_answers_process(compressing_pusher, options):
    with services.channel(compressing_pusher.addr, options=options) as channel:
        conversation_id = unique("compressed")
        ack = pusher_pb2_grpc.PusherStub(channel).Process(
            process_request(conversation_id, COMPRESSIBLE, "Remember to call the client."), timeout=CALL_TIMEOUT)
    assert ack.conversation_id == conversation_id
    assert ack.WhichOneof("outcome") == "processed", ack
