"""Paging through conversations of about 3 MiB each with grpcio's default limits (4 MiB per
received message): ListConversations keeps every page under the limit, in the FULL view as in
the default (BASIC) one, and each conversation comes exactly once."""

import pytest

from helpers import CALL_TIMEOUT, unique
from listen.v1 import listen_pb2

CONVERSATIONS = 3
# Within listen's defaults (--max-segments 10 000, --max-segment-bytes 16 384,
# --max-message-bytes 16 MiB): 200 segments of 16 000 bytes, 3.2 MB a conversation, so two
# of them do not fit in one 4 MiB message.
SEGMENTS = 200
SEGMENT_BYTES = 16_000
# Submits take longer than the small calls: 3.2 MB each, stored durably.
SUBMIT_TIMEOUT = 30.0


def segment_text(conversation: int, segment: int) -> str:
    head = f"conversation {conversation} segment {segment}: I will read page {segment}. "
    return (head + "x" * SEGMENT_BYTES)[:SEGMENT_BYTES]


@pytest.fixture(scope="module")
def big(listen_stub):
    """(uid, ids) of CONVERSATIONS conversations of SEGMENTS * SEGMENT_BYTES each."""
    uid = unique("pager")
    ids = []
    for n in range(CONVERSATIONS):
        request = listen_pb2.SubmitConversationRequest(uid=uid, idempotency_key=f"big-{n}", segments=[
            listen_pb2.Segment(text=segment_text(n, i), start=i, end=i + 1) for i in range(SEGMENTS)])
        assert request.ByteSize() > 3 * 1024 * 1024
        ids.append(listen_stub.SubmitConversation(request, timeout=SUBMIT_TIMEOUT).conversation_id)
    return uid, ids


def all_pages(stub, request, max_pages=20):
    """Every page of a listing, following next_page_token; fails on an empty page or a loop."""
    pages = []
    while True:
        page = stub.ListConversations(request, timeout=CALL_TIMEOUT)
        assert page.conversations, f"page {len(pages) + 1} is empty (next_page_token={page.next_page_token!r})"
        pages.append(page)
        if not page.next_page_token:
            return pages
        assert len(pages) < max_pages, f"more than {max_pages} pages for {CONVERSATIONS} conversations"
        request.page_token = page.next_page_token


def ids_of(pages):
    return [c.id for page in pages for c in page.conversations]


def test_full_view_pages_fit_the_default_receive_limit(listen_stub, big):
    uid, ids = big
    pages = all_pages(listen_stub, listen_pb2.ListConversationsRequest(uid=uid, view=listen_pb2.CONVERSATION_VIEW_FULL))
    seen = ids_of(pages)
    assert sorted(seen) == sorted(ids), f"{seen} for {ids}"
    assert len(pages) >= 2, "two 3 MiB conversations would not fit in one 4 MiB page"
    for page in pages:
        assert page.ByteSize() <= 4 * 1024 * 1024
        for conversation in page.conversations:
            assert len(conversation.segments) == SEGMENTS, conversation.id
            assert conversation.segment_count == SEGMENTS


def test_default_view_is_basic_and_pages_through_everything(listen_stub, big):
    uid, ids = big
    pages = all_pages(listen_stub, listen_pb2.ListConversationsRequest(uid=uid))
    seen = ids_of(pages)
    assert sorted(seen) == sorted(ids), f"{seen} for {ids}"
    for page in pages:
        for conversation in page.conversations:
            assert len(conversation.segments) == 0, f"{conversation.id}: BASIC view carries segments"
            assert conversation.segment_count == SEGMENTS


def test_small_pages_continue_after_the_last_conversation(listen_stub, big):
    uid, ids = big
    pages = all_pages(listen_stub, listen_pb2.ListConversationsRequest(uid=uid, page_size=1))
    assert [len(page.conversations) for page in pages] == [1] * CONVERSATIONS
    assert sorted(ids_of(pages)) == sorted(ids)


def test_get_full_of_a_3_mib_conversation(listen_stub, big):
    _, ids = big
    got = listen_stub.GetConversation(listen_pb2.GetConversationRequest(conversation_id=ids[0]), timeout=CALL_TIMEOUT)
    assert len(got.segments) == SEGMENTS
    assert got.segments[7].text == segment_text(0, 7)
    assert got.ByteSize() > 3 * 1024 * 1024
