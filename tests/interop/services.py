"""The real listen-svc and pusher-svc processes, as tests/src/processes.rs starts them: each
on a free 127.0.0.1 port picked by binding and releasing it, ready once gRPC health says
SERVING (never by sleeping), killed at the end. Every wait has a deadline."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Loopback only; grpcio would otherwise honour http_proxy and friends.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

# Flags that keep tests quick, as the Rust harness's FAST_LINK: listen reconnects to pusher
# within 100 ms-500 ms instead of 1 s-30 s.
FAST_LINK = [
    "--reconnect-initial", "100ms",
    "--reconnect-max", "500ms",
    "--retry-initial", "100ms",
    "--probe-interval", "1s",
]


def bin_dir() -> Path:
    value = os.environ.get("INTEROP_BIN_DIR")
    if not value:
        raise RuntimeError("INTEROP_BIN_DIR is not set: run the suite with tests/interop/run.sh")
    return Path(value)


def binary(name: str) -> Path:
    path = bin_dir() / name
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: build it, or run tests/interop/run.sh")
    return path


def free_port() -> int:
    """A free loopback port (bound and released; the kernel does not hand it out again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel(addr: str, **kwargs) -> grpc.Channel:
    """A plaintext channel with grpcio's defaults (4 MiB receive limit, ...) unless told."""
    options = CHANNEL_OPTIONS + kwargs.pop("options", [])
    return grpc.insecure_channel(addr, options=options, **kwargs)


class Service:
    """One running service process, logging to `log`."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.args = ["--listen-addr", self.addr, "--admin-addr", "off", *args]
        self.log = workdir / f"{name}-{self.port}.log"
        # The services read LISTEN_* / PUSHER_* variables as flags: none leak in from outside.
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PUSHER_"))}
        clean["RUST_LOG"] = os.environ.get("TEST_RUST_LOG", "info,listen_svc=debug,pusher_svc=debug")
        clean.update(env or {})
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary(name)), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=clean,
            )

    def health(self, service: str = "") -> int | None:
        """The serving status of `service`, or None if the server does not answer."""
        with channel(self.addr) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            except grpc.RpcError:
                return None
            return reply.status

    def wait_healthy(self, service: str = "", timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"{self.name} exited during start-up ({code}):\n{self.log_tail()}")
            if self.health(service) == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} {service!r} not SERVING within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_pusher(workdir: Path, extra: list[str] = ()) -> Service:
    """pusher-svc with no simulated latency: a conversation is processed as soon as it arrives."""
    service = Service("pusher-svc", ["--simulated-latency", "0s", *extra], workdir)
    try:
        service.wait_healthy()
    except BaseException:
        service.stop()
        raise
    return service


def start_listen(workdir: Path, pusher: Service, extra: list[str] = (), env: dict[str, str] | None = None) -> Service:
    """listen-svc with its own SQLite store, linked to `pusher`; ready once its link is up."""
    store = workdir / f"listen-{free_port()}.db"
    args = ["--pusher-url", f"http://{pusher.addr}", "--store", f"sqlite://{store}",
            "--instance-id", "listen-interop", *FAST_LINK, *extra]
    service = Service("listen-svc", args, workdir, env)
    try:
        service.wait_healthy()
        service.wait_healthy("listen.v1.PusherLink")
    except BaseException:
        service.stop()
        raise
    return service


def help_text(name: str) -> str:
    return subprocess.run([str(binary(name)), "--help"], capture_output=True, text=True,
                          timeout=10, check=True).stdout


def flag_with_value(name: str, flag: str, value: str) -> list[str]:
    """`flag value` if `name --help` shows the flag taking a value, `flag` if it is a switch;
    fails when the binary has no such flag."""
    for line in help_text(name).splitlines():
        words = line.split()
        if words and words[0].rstrip(",") == flag:
            takes_value = len(words) > 1 and words[1].startswith(("<", "[<"))
            return [flag, value] if takes_value else [flag]
    raise AssertionError(f"{name} --help shows no {flag}")
