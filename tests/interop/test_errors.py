"""Errors as a grpcio client sees them: the status code, and details in plain words that name
the field (never a Rust type name)."""

import re

import grpc
import pytest

from helpers import CALL_TIMEOUT, rpc_error, talk
from listen.v1 import listen_pb2
from listen.v1 import listen_pb2_grpc
import services

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
# A word like InvalidToken or ErrorKind: Rust's Debug output leaking into a message.
TYPE_NAME = re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b")


def plain_words(details: str) -> None:
    assert details, "no message"
    assert not TYPE_NAME.search(details), f"a type name in {details!r}"
    assert "::" not in details and "{" not in details, details


def test_empty_uid_is_invalid_argument_naming_uid(listen_stub):
    error = rpc_error(listen_stub.SubmitConversation, talk("", "I will call the bank."), timeout=CALL_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith("uid"), error.details()
    plain_words(error.details())


def test_oversized_segment_names_the_segment(listen_stub):
    error = rpc_error(listen_stub.SubmitConversation, talk("alice", "ok", "x" * 20_000), timeout=CALL_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith("segments[1].text"), error.details()
    plain_words(error.details())


def test_unknown_conversation_is_not_found(listen_stub):
    error = rpc_error(listen_stub.GetConversation, listen_pb2.GetConversationRequest(conversation_id="0190f2b0-0000-7000-8000-000000000000"),
                      timeout=CALL_TIMEOUT)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    plain_words(error.details())


@pytest.fixture(scope="module")
def auth_stub(launch, pusher):
    """A listen-svc that requires bearer tokens (HS256, the secret from the environment)."""
    guarded = launch("listen", pusher, env={"LISTEN_AUTH_JWT_SECRET": SECRET})
    with services.channel(guarded.addr) as channel:
        yield listen_pb2_grpc.ListenStub(channel)


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer not-a-jwt",
    "Bearer eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
    "Basic YWxpY2U6c2VjcmV0",
], ids=["missing", "not-a-jwt", "garbage-jwt", "basic-scheme"])
def test_bad_bearer_token_is_unauthenticated_in_plain_words(auth_stub, authorization):
    metadata = [] if authorization is None else [("authorization", authorization)]
    error = rpc_error(auth_stub.SubmitConversation, talk("alice", "I will call the bank."),
                      metadata=metadata, timeout=CALL_TIMEOUT)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    plain_words(error.details())
