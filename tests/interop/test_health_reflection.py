"""grpc.health.v1 and server reflection as grpcio's own clients use them: Check and Watch
(an unknown name streams SERVICE_UNKNOWN and the call stays open), and reflection through
ProtoReflectionDescriptorDatabase and a DescriptorPool (a missing symbol is a KeyError)."""

import threading

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import services
from helpers import CALL_TIMEOUT

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

SERVERS = pytest.mark.parametrize("server", ["listen", "pusher"], indirect=True)


@pytest.fixture
def server(request):
    """The shared listen-svc or pusher-svc, by name."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("server, name", [
    ("listen", ""), ("listen", "listen.v1.Listen"), ("listen", "listen.v1.PusherLink"),
    ("pusher", ""), ("pusher", "pusher.v1.Pusher"),
], indirect=["server"])
def test_check(server, name):
    with services.channel(server.addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name),
                                                          timeout=CALL_TIMEOUT)
    assert reply.status == SERVING


@SERVERS
def test_check_of_an_unknown_name_is_not_found(server):
    with services.channel(server.addr) as channel:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                                      timeout=CALL_TIMEOUT)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("server, name", [("listen", "listen.v1.Listen"), ("pusher", "pusher.v1.Pusher")],
                         indirect=["server"])
def test_watch_of_a_known_name_streams_serving(server, name):
    with services.channel(server.addr) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name),
                                                        timeout=CALL_TIMEOUT)
        assert next(call).status == SERVING
        call.cancel()


@SERVERS
def test_watch_of_an_unknown_name_streams_service_unknown_and_stays_open(server):
    with services.channel(server.addr) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_TIMEOUT)
        first = next(call)
        assert first.status == SERVICE_UNKNOWN

        # Nothing more for a second: no second message, and the call does not end.
        after = []

        def read_next():
            try:
                after.append(next(call))
            except StopIteration:
                after.append("the stream ended")
            except grpc.RpcError as error:
                after.append(error.code())

        reader = threading.Thread(target=read_next, daemon=True)
        reader.start()
        reader.join(1.0)
        assert reader.is_alive() and not after, f"after SERVICE_UNKNOWN: {after}"
        assert not call.done()

        call.cancel()
        reader.join(5.0)
        assert after == [grpc.StatusCode.CANCELLED], after


@pytest.mark.parametrize("server, service, method, input_type, message, field", [
    ("listen", "listen.v1.Listen", "SubmitConversation", "listen.v1.SubmitConversationRequest",
     "listen.v1.Conversation", "segment_count"),
    ("pusher", "pusher.v1.Pusher", "Process", "pusher.v1.ProcessConversation",
     "pusher.v1.Ack", "processed"),
], indirect=["server"])
def test_reflection_through_a_descriptor_pool(server, service, method, input_type, message, field):
    with services.channel(server.addr) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        listed = set(database.get_services())
        assert service in listed, listed
        assert "grpc.health.v1.Health" in listed, listed
        # Each server lists only its own services.
        assert not {s for s in listed if s.startswith(("listen.", "pusher.")) and s != service}, listed

        pool = descriptor_pool.DescriptorPool(database)
        # A missing symbol first, on a fresh pool: KeyError, and the pool still works after it.
        with pytest.raises(KeyError):
            pool.FindServiceByName(service + "Missing")
        with pytest.raises(KeyError):
            pool.FindMessageTypeByName("no.such.Message")
        found = pool.FindServiceByName(service)
        assert found.FindMethodByName(method).input_type.full_name == input_type
        assert field in pool.FindMessageTypeByName(message).fields_by_name


@SERVERS
def test_reflection_answers_a_missing_symbol_in_the_stream(server):
    """v1alpha, as grpcio speaks it: an error_response (NOT_FOUND) for the missing symbol, and
    the same stream then answers the next request."""
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    ]
    with services.channel(server.addr) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(requests), timeout=CALL_TIMEOUT)
        responses = list(call)
    assert [r.WhichOneof("message_response") for r in responses] == \
        ["error_response", "file_descriptor_response"], responses
    assert responses[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses[0].error_response.error_message
