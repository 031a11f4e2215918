"""Requests and checks the tests share."""

import uuid

import grpc

from listen.v1 import listen_pb2
from pusher.v1 import pusher_pb2

# Every unary call's deadline, and a whole Session's.
CALL_TIMEOUT = 10.0
SESSION_TIMEOUT = 30.0

# About 4 KiB of text that compresses well: grpcio sends a message uncompressed when
# compressing would not make it smaller, and these tests must put compressed bytes on the wire.
COMPRESSIBLE = "So, the launch checklist. I will book the venue and send the invitations. " * 55

OUTCOMES = ("conversation_processed", "conversation_failed", "conversation_discarded")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def talk(uid: str, *texts: str, key: str = "") -> listen_pb2.SubmitConversationRequest:
    segments = [listen_pb2.Segment(text=t, start=2.0 * i, end=2.0 * i + 2) for i, t in enumerate(texts)]
    return listen_pb2.SubmitConversationRequest(uid=uid, segments=segments, idempotency_key=key)


def process_request(conversation_id: str, *texts: str) -> pusher_pb2.ProcessConversation:
    return pusher_pb2.ProcessConversation(
        conversation_id=conversation_id, uid="interop", attempt=1, language="en",
        segments=[pusher_pb2.Segment(text=t) for t in texts])


def start(uid: str, timeout_s: int = 30) -> listen_pb2.SessionRequest:
    return listen_pb2.SessionRequest(start=listen_pb2.Start(uid=uid, conversation_timeout_s=timeout_s))


def segments(*texts: str, at: float = 0.0) -> listen_pb2.SessionRequest:
    return listen_pb2.SessionRequest(segments=listen_pb2.Segments(segments=[
        listen_pb2.Segment(text=t, start=at + 2.0 * i, end=at + 2.0 * i + 2) for i, t in enumerate(texts)]))


def finish() -> listen_pb2.SessionRequest:
    return listen_pb2.SessionRequest(finish=listen_pb2.Finish())


def run_session(stub, requests, **kwargs) -> list[listen_pb2.SessionEvent]:
    """Sends `requests`, then half-closes (the iterator ends), and reads events until the
    server ends the stream. Raises grpc.RpcError unless the stream ends with OK."""
    call = stub.Session(iter(requests), timeout=SESSION_TIMEOUT, **kwargs)
    events = list(call)
    assert call.code() == grpc.StatusCode.OK, call.code()
    return events


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The grpc.RpcError that `call(*args, **kwargs)` raises; fails if the call succeeds."""
    try:
        reply = call(*args, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"expected an error, got {reply!r}")
