"""Fixtures of the interoperability suite: one pusher-svc and one listen-svc shared by the
whole run (real binaries on loopback ports), plus servers started with particular flags by
the tests that need them. tests/interop/run.sh sets INTEROP_BIN_DIR and INTEROP_STUBS."""

import importlib
import os

import pytest

import services

STARTED: list[services.Service] = []

# The stubs generated from proto/ must be there: a missing one fails the run, it skips nothing.
if not os.environ.get("INTEROP_STUBS"):
    raise pytest.UsageError("INTEROP_STUBS is not set: run the suite with tests/interop/run.sh")
for module in ("listen.v1.listen_pb2", "listen.v1.listen_pb2_grpc",
               "pusher.v1.pusher_pb2", "pusher.v1.pusher_pb2_grpc"):
    importlib.import_module(module)

from listen.v1 import listen_pb2_grpc  # noqa: E402
from pusher.v1 import pusher_pb2_grpc  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def launch(workdir):
    """launch(kind, *args): a pusher ("pusher", extra flags) or a listen ("listen", pusher,
    extra flags, env) started for the caller; every one is stopped at the end of the run."""

    def launch(kind, *args, **kwargs):
        if kind == "pusher":
            service = services.start_pusher(workdir, *args, **kwargs)
        else:
            service = services.start_listen(workdir, *args, **kwargs)
        STARTED.append(service)
        return service

    yield launch
    # Listens before the pushers they are linked to, so no listen sees its pusher go away.
    for service in reversed(STARTED):
        service.stop()


@pytest.fixture(scope="session")
def pusher(launch):
    return launch("pusher")


@pytest.fixture(scope="session")
def listen(launch, pusher):
    return launch("listen", pusher)


@pytest.fixture(scope="session")
def listen_channel(listen):
    """A channel with grpcio's default options (4 MiB receive limit, no compression)."""
    with services.channel(listen.addr) as channel:
        yield channel


@pytest.fixture(scope="session")
def listen_stub(listen_channel):
    return listen_pb2_grpc.ListenStub(listen_channel)


@pytest.fixture(scope="session")
def pusher_stub(pusher):
    with services.channel(pusher.addr) as channel:
        yield pusher_pb2_grpc.PusherStub(channel)


def pytest_terminal_summary(terminalreporter, exitstatus):
    """On failure, the end of every service's log (the tests' own messages say what was wrong
    on the wire; the logs say what the server thought)."""
    if exitstatus == 0 or not STARTED:
        return
    for service in STARTED:
        terminalreporter.section(f"{service.name} on {service.addr}: {service.log}")
        terminalreporter.write_line(service.log_tail(40))

