"""Session from grpcio, which half-closes when the request iterator ends: the server finishes
a conversation still in progress, keeps the stream open until each finished conversation
has its outcome event, then ends the stream with OK."""

import threading
import time

import grpc

from helpers import (CALL_TIMEOUT, OUTCOMES, SESSION_TIMEOUT, finish, kinds, run_session, segments, start,
                     unique)
from listen.v1 import listen_pb2


def started_conversation(events) -> str:
    ids = [e.conversation_started.conversation_id for e in events if e.HasField("conversation_started")]
    assert len(ids) == 1, kinds(events)
    return ids[0]


def check_processed(event, conversation_id, uid):
    processed = event.conversation_processed.conversation
    assert processed.id == conversation_id
    assert processed.uid == uid
    assert processed.status == listen_pb2.CONVERSATION_STATUS_COMPLETED, processed
    # BASIC view: the client sent the segments; segment_count says how many there were.
    assert len(processed.segments) == 0, processed
    assert processed.segment_count == 2, processed
    assert processed.structured.action_items, processed


def test_half_close_after_finish_gets_conversation_processed(listen_stub):
    uid = unique("session")
    events = run_session(listen_stub, [
        start(uid),
        segments("So, the launch checklist."),
        segments("I will book the venue.", at=2),
        finish(),
    ])
    seen = kinds(events)
    assert seen[0] == "session_started", seen
    assert seen.count("segments_stored") == 2, seen
    assert "processing_started" in seen, seen
    # The stream ended (OK) right after the conversation's outcome.
    assert seen[-1] == "conversation_processed", seen
    assert sum(kind in OUTCOMES for kind in seen) == 1, seen
    check_processed(events[-1], started_conversation(events), uid)
    stored = [e.segments_stored.total_segments for e in events if e.HasField("segments_stored")]
    assert stored == [1, 2], stored


def test_half_close_without_finish_finishes_the_conversation(listen_stub):
    uid = unique("session")
    events = run_session(listen_stub, [
        start(uid),
        segments("So, the budget review."),
        segments("Remember to send the invoice.", at=2),
    ])
    seen = kinds(events)
    assert seen.count("segments_stored") == 2, seen
    assert seen[-1] in OUTCOMES, seen
    assert seen[-1] == "conversation_processed", seen
    check_processed(events[-1], started_conversation(events), uid)


def test_the_finished_conversation_reads_back_in_full(listen_stub):
    uid = unique("session")
    events = run_session(listen_stub, [start(uid), segments("One.", "Two, I will call the bank."), finish()])
    conversation_id = started_conversation(events)
    full = listen_stub.GetConversation(listen_pb2.GetConversationRequest(conversation_id=conversation_id),
                                       timeout=CALL_TIMEOUT)
    assert [s.text for s in full.segments] == ["One.", "Two, I will call the bank."]
    assert full.segment_count == 2
    basic = listen_stub.GetConversation(
        listen_pb2.GetConversationRequest(conversation_id=conversation_id, view=listen_pb2.CONVERSATION_VIEW_BASIC),
        timeout=CALL_TIMEOUT)
    assert len(basic.segments) == 0 and basic.segment_count == 2, basic


def open_session_until_stored(stub, uid, **kwargs):
    """A Session whose request side stays open: Start and one Segments, read up to
    segments_stored. Returns (call, session_id, conversation_id, release); release() ends the
    requests."""
    done = threading.Event()

    def requests():
        yield start(uid)
        yield segments("The first half of the story.")
        done.wait(SESSION_TIMEOUT)

    call = stub.Session(requests(), **kwargs)
    session_id = None
    for event in call:
        if event.HasField("session_started"):
            session_id = event.session_started.session_id
        if event.HasField("segments_stored"):
            return call, session_id, event.segments_stored.conversation_id, done.set
    raise AssertionError("no segments_stored")


def wait_ended_as_cancelled(listen, session_id):
    """Until listen logs that it ended the session as a cancel (not as a half-close)."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while time.monotonic() < deadline:
        for line in listen.log.read_text(errors="replace").splitlines():
            if "session ended" in line and session_id in line:
                assert "cancelled or disconnected" in line, line
                return
        time.sleep(0.02)
    raise AssertionError(f"listen did not end session {session_id}:\n{listen.log_tail()}")


def resumed_by_a_new_session(stub, uid) -> str:
    events = run_session(stub, [start(uid), finish()])
    return events[0].session_started.resumed_conversation_id


def test_a_cancelled_session_leaves_its_conversation_to_resume(listen, listen_stub):
    uid = unique("cancel")
    call, session_id, conversation_id, release = open_session_until_stored(
        listen_stub, uid, timeout=SESSION_TIMEOUT)
    call.cancel()
    # The request side stays open until listen has ended the session.
    wait_ended_as_cancelled(listen, session_id)
    release()
    # Cancel is not half-close: the conversation waits for its owner to come back.
    assert resumed_by_a_new_session(listen_stub, uid) == conversation_id


def test_a_session_past_its_deadline_leaves_its_conversation_to_resume(listen, listen_stub):
    uid = unique("deadline")
    call, session_id, conversation_id, release = open_session_until_stored(listen_stub, uid, timeout=2.0)
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    wait_ended_as_cancelled(listen, session_id)
    release()
    assert resumed_by_a_new_session(listen_stub, uid) == conversation_id
