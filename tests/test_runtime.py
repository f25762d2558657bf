"""The shared server runtime (services/common): health NOT_SERVING until ready and while
draining, RPCs UNAVAILABLE until on_start completes, reflection, the error interceptor,
graceful SIGTERM, flags with env fallbacks, one bearer check."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from extmind import errors
from extmind.channels import aio_channel, sync_channel
from extmind.procs import health_status
from extmind.v1 import memory_pb2, memory_pb2_grpc
from services.common.auth import check_bearer
from services.common.config import FlagParser, add_server_flags
from services.common.server import Server, Service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAME = "extmind.v1.MemoryService"


def _args(**kw):
    p = FlagParser()
    add_server_flags(p, prefix="RUNTIME_TEST", port=0)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class Toy(memory_pb2_grpc.MemoryServiceServicer):
    """GetMemory: 'slow' sleeps 1 s; 'bad' raises InvalidArgument; 'boom' raises a bug."""

    async def GetMemory(self, request, context):
        if request.memory_id == "slow":
            await asyncio.sleep(1.0)
        if request.memory_id == "bad":
            raise errors.InvalidArgument("memory_id 'bad' is bad: use another")
        if request.memory_id == "boom":
            raise ZeroDivisionError("division by zero")
        return memory_pb2.GetMemoryResponse(memory=memory_pb2.Memory(memory_id=request.memory_id))

    async def FetchMemory(self, request, context):
        yield memory_pb2.FetchMemoryResponse(layer=0)
        raise errors.NotFound("no more layers here")


async def _health(ch, service=NAME):
    try:
        return (
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        ).status
    except grpc.aio.AioRpcError:
        return None


async def test_health_not_serving_until_ready_then_drains():
    ready = asyncio.Event()

    async def on_start():
        await ready.wait()

    stopped = []
    server = Server(
        _args(),
        [Service(NAME, lambda s: memory_pb2_grpc.add_MemoryServiceServicer_to_server(Toy(), s))],
        on_start=on_start,
        on_stop=lambda: _note(stopped),
    )
    starting = asyncio.create_task(server.start())
    for _ in range(100):
        if server.port:
            break
        await asyncio.sleep(0.02)
    async with aio_channel(f"127.0.0.1:{server.port}") as ch:
        await asyncio.sleep(0.1)
        assert await _health(ch) == NOT_SERVING
        assert await _health(ch, "") == NOT_SERVING
        ready.set()
        await starting
        assert await _health(ch) == SERVING and await _health(ch, "") == SERVING

        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        slow = asyncio.ensure_future(stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="slow"), timeout=10))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.1)
        assert (await slow).memory.memory_id == "slow"  # in-flight call finished during the drain
        await stopping
    assert stopped == ["yes"]


async def test_rpcs_answer_unavailable_until_on_start_completes():
    """The one readiness guard: while a slow on_start runs, every RPC but health answers
    UNAVAILABLE "<service> is loading (...)"; once it completes the same calls succeed."""
    ready = asyncio.Event()

    async def on_start():
        await ready.wait()

    server = Server(
        _args(),
        [Service(NAME, lambda s: memory_pb2_grpc.add_MemoryServiceServicer_to_server(Toy(), s))],
        on_start=on_start,
        label="the toy service",
        loading="warming up",
    )
    starting = asyncio.create_task(server.start())
    for _ in range(100):
        if server.port:
            break
        await asyncio.sleep(0.02)
    try:
        async with aio_channel(f"127.0.0.1:{server.port}") as ch:
            stub = memory_pb2_grpc.MemoryServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="m"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details().startswith("the toy service is loading (warming up); retry shortly")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.FetchMemory(memory_pb2.FetchMemoryRequest(), timeout=5):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "is loading" in e.value.details()
            assert await _health(ch) == NOT_SERVING  # health answers throughout
            ready.set()
            await starting
            r = await stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="m"), timeout=5)
            assert r.memory.memory_id == "m"
            layers = []
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for x in stub.FetchMemory(memory_pb2.FetchMemoryRequest(), timeout=5):
                    layers.append(x.layer)
            assert layers == [0] and e.value.code() == grpc.StatusCode.NOT_FOUND  # the servicer's own answer
    finally:
        ready.set()
        await server.stop(grace=0)


async def _note(out):
    out.append("yes")


def _sync_checks(address: str) -> None:
    with sync_channel(address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert NAME in services and "grpc.health.v1.Health" in services
        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="bad"), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "use another" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="boom"), timeout=5)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "still up" in e.value.details()
        stream = stub.FetchMemory(memory_pb2.FetchMemoryRequest(), timeout=5)
        assert next(stream).layer == 0
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="ok"), timeout=5).memory.memory_id == "ok"


async def test_reflection_and_error_mapping():
    server = Server(_args(), [Service(NAME, lambda s: memory_pb2_grpc.add_MemoryServiceServicer_to_server(Toy(), s))])
    await server.start()
    try:
        # Blocking clients run on a thread: the server shares this event loop.
        await asyncio.wait_for(asyncio.to_thread(_sync_checks, f"127.0.0.1:{server.port}"), 30)
    finally:
        await server.stop(grace=0)


def _unimplemented_code(address: str):
    with sync_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            memory_pb2_grpc.MemoryServiceStub(ch).ListMemories(memory_pb2.ListMemoriesRequest(), timeout=5)
        return e.value.code()


async def test_unimplemented_rpc_is_unimplemented():
    server = Server(_args(), [Service(NAME, lambda s: memory_pb2_grpc.add_MemoryServiceServicer_to_server(Toy(), s))])
    await server.start()
    try:
        code = await asyncio.wait_for(asyncio.to_thread(_unimplemented_code, f"127.0.0.1:{server.port}"), 30)
    finally:
        await server.stop(grace=0)
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_sigterm_is_graceful(memory_service):
    """SIGTERM: health goes NOT_SERVING, in-flight calls finish, exit code 0."""
    import numpy as np

    from extmind.tensor import FLOAT32
    from tests.memory import helpers as h

    stub = memory_service.stub()
    rng = np.random.default_rng(0)
    K, V = h.random_kv(rng, 2, 1, 8, 4, FLOAT32)
    h.create(stub, "g", K, FLOAT32)
    held = h.HeldAppend(stub, "g", K, V, FLOAT32)  # still open when SIGTERM arrives
    memory_service.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while health_status(memory_service.address, NAME) == SERVING and time.monotonic() < deadline:
        time.sleep(0.02)
    held.release()
    assert held.result().state == memory_pb2.MEMORY_STATE_READY
    assert memory_service.proc.wait(30) == 0
    log = memory_service.log_tail(200)
    assert "stopped" in log and "Traceback" not in log


def test_bearer_check():
    assert check_bearer("Bearer s3cret", "s3cret") and check_bearer(b"Bearer s3cret", "s3cret")
    assert not check_bearer("Bearer wrong", "s3cret") and not check_bearer(None, "s3cret")
    assert check_bearer("bearer s3cret", "s3cret") and check_bearer("BEARER s3cret", "s3cret")  # any case
    for bad in ("Basic s3cret", "Bearer  s3cret", "Bearers3cret", "s3cret", "Bearer s3cret "):
        assert not check_bearer(bad, "s3cret"), bad
    assert not check_bearer("s3cret", "s3cret")  # the scheme is part of the header
    assert check_bearer(None, "")  # no token configured: auth is off


def test_flags_fall_back_to_environment(monkeypatch):
    monkeypatch.setenv("RUNTIME_TEST_PORT", "1234")
    monkeypatch.setenv("EXTMIND_AUTH_TOKEN", "tok")
    p = FlagParser()
    add_server_flags(p, prefix="RUNTIME_TEST", port=9)
    args = p.parse_args([])
    assert args.port == 1234 and args.auth_token == "tok"
    assert p.parse_args(["--port", "77"]).port == 77  # the flag wins over the variable
    assert "RUNTIME_TEST_PORT" in p.format_help()


def _self_signed(tmp_path):
    """A throwaway certificate for localhost, made by the openssl command line."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a test certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_from_certificate_files(tmp_path):
    """--tls-cert/--tls-key serve TLS: a client trusting the certificate gets answers (auth on
    top), a plaintext client gets none."""
    cert, key = _self_signed(tmp_path)
    server = Server(
        _args(tls_cert=str(cert), tls_key=str(key), auth_token="s3cret"),
        [Service(NAME, lambda s: memory_pb2_grpc.add_MemoryServiceServicer_to_server(Toy(), s))],
    )
    await server.start()
    try:
        async with aio_channel(f"grpcs://localhost:{server.port}", root_certs=cert.read_bytes()) as ch:
            assert await _health(ch) == SERVING
            stub = memory_pb2_grpc.MemoryServiceStub(ch)
            r = await stub.GetMemory(
                memory_pb2.GetMemoryRequest(memory_id="m"), timeout=5, metadata=(("authorization", "Bearer s3cret"),)
            )
            assert r.memory.memory_id == "m"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="m"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with aio_channel(f"127.0.0.1:{server.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await memory_pb2_grpc.MemoryServiceStub(plain).GetMemory(
                    memory_pb2.GetMemoryRequest(memory_id="m"), timeout=3
                )
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await server.stop(grace=0)


def test_malformed_flags_and_environment_values_are_one_line_usage_errors(monkeypatch, capsys, tmp_path):
    """A wrong value, given as a flag or through its environment variable, stops the start with
    exit code 2 and one line naming it (a malformed environment value used to be a traceback)."""
    from services.memory.app import parse_args

    for argv, env, says in (
        (["--max-response-mb", "0"], {}, "must be a finite number > 0"),
        (["--max-response-mb", "-1"], {}, "must be a finite number > 0"),
        ([], {"MEMORY_MAX_RESPONSE_MB": "lots"}, "MEMORY_MAX_RESPONSE_MB='lots' is not valid"),
        ([], {"MEMORY_PORT": "abc"}, "MEMORY_PORT='abc' is not valid"),
        (["--http-port", "70000"], {}, "must be -1 (off), 0 (a free port) or 1-65535"),
        ([], {"MEMORY_HTTP_PORT": "-2"}, "MEMORY_HTTP_PORT='-2' is not valid"),
        # a typo in a boolean must not silently mean false
        ([], {"MEMORY_ALLOW_VOLATILE_REDIS": "ture"}, "MEMORY_ALLOW_VOLATILE_REDIS='ture' is not valid"),
        # a peer's URL that gRPC would take for a host name (and fail on at the first call)
        (["--embedder-url", "http//embedder:50051"], {}, "'http//embedder:50051' is not a gRPC target: use host:port"),
        ([], {"EMBEDDER_URL": "localhost"}, "EMBEDDER_URL='localhost' is not valid: 'localhost' is not a gRPC target"),
    ):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and err.count("\n") == 1, err
        for k in env:
            monkeypatch.delenv(k)
    assert parse_args(["--max-response-mb", "0.5"]).max_response_mb == 0.5
    assert parse_args(["--embedder-url", "grpc://embedder:50051"]).embedder_url == "grpc://embedder:50051"
    assert parse_args([]).embedder_url == ""  # none
    monkeypatch.setenv("EMBEDDER_URL", " ")
    assert parse_args([]).embedder_url == ""  # blank is none, not a URL that fails at the first call
    for word, value in (("Yes", True), ("on", True), ("1", True), ("OFF", False), ("0", False), ("false", False)):
        monkeypatch.setenv("MEMORY_ALLOW_VOLATILE_REDIS", word)
        assert parse_args([]).allow_volatile_redis is value, word


def test_a_wrong_environment_value_gives_way_to_the_flag_and_to_help(monkeypatch, capsys):
    """A wrong variable is a usage error only when its flag is not given: the flag wins over the
    variable, and --help still shows the whole help (it used to stop at the wrong variable, with a
    usage line that lacked that flag and every later one)."""
    from services.generator.app import parse_args

    monkeypatch.setenv("GENERATOR_FUSED_ATTENTION", "on")
    monkeypatch.setenv("GENERATOR_WINDOW", "abc")
    monkeypatch.setenv("EXTMIND_AUTH_TOKEN", "tok")
    args = parse_args(["--model", "m", "--fused-attention", "off", "--window", "1024"])
    assert (args.fused_attention, args.window, args.auth_token) == ("off", 1024, "tok")
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", "--window", "1024"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "GENERATOR_FUSED_ATTENTION='on' is not valid: use one of auto, off" in err
    assert err.count("\n") == 1 and err.endswith("(--help lists every flag)\n"), err  # one line
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", "--fused-attention", "auto"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "GENERATOR_WINDOW='abc' is not valid: expected a whole number" in err
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--fused-attention {auto,off}" in out
    assert "(default: GENERATOR_FUSED_ATTENTION='on', not valid)" in out


def test_an_unwritable_health_file_stops_the_start_in_one_line(tmp_path):
    from extmind.errors import InvalidArgument
    from services.common.health_file import HealthFile

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InvalidArgument, match="--health-file .* cannot be written"):
        HealthFile(str(blocker / "serving")).check()  # its folder is a file
    ok = HealthFile(str(tmp_path / "run" / "serving"))
    ok.check()
    assert (tmp_path / "run").is_dir() and not ok.path.exists()


def test_the_stream_interval_takes_a_finite_number_of_milliseconds_or_says_what_to_change(monkeypatch, capsys):
    """--stream-interval-ms / GENERATOR_STREAM_INTERVAL_MS: 0 and fractions are fine; a negative,
    infinite, NaN or non-numeric value stops the start with exit code 2 naming it."""
    from services.generator.app import parse_args

    assert parse_args(["--model", "m"]).stream_interval_ms == 5.0
    assert parse_args(["--model", "m", "--stream-interval-ms", "0"]).stream_interval_ms == 0.0
    assert parse_args(["--model", "m", "--stream-interval-ms", "2.5"]).stream_interval_ms == 2.5
    for raw, says in (
        ("-1", "must be a finite number >= 0"),
        ("inf", "must be a finite number >= 0"),
        ("nan", "must be a finite number >= 0"),
        ("abc", "expected a number"),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(["--model", "m", "--stream-interval-ms", raw])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--stream-interval-ms" in err and says in err, err
        monkeypatch.setenv("GENERATOR_STREAM_INTERVAL_MS", raw)
        with pytest.raises(SystemExit) as e:
            parse_args(["--model", "m"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"GENERATOR_STREAM_INTERVAL_MS={raw!r} is not valid" in err and says in err, err
        monkeypatch.delenv("GENERATOR_STREAM_INTERVAL_MS")


@pytest.mark.parametrize(
    "url, target, tls",
    [
        ("localhost:50051", "localhost:50051", False),
        (" grpc://memory:50052/ ", "memory:50052", False),
        ("grpcs://memory.example:443", "memory.example:443", True),
        ("[::1]:50051", "[::1]:50051", False),
        ("unix:/tmp/extmind.sock", "unix:/tmp/extmind.sock", False),
        ("dns:///memory:50052", "dns:///memory:50052", False),
        ("DNS:///memory:50052", "DNS:///memory:50052", False),
        ("xds:///memory", "xds:///memory", False),
        ("grpcs://memory.example", "memory.example", True),  # gRPC's default port
        ("extmind_memory_1:50052", "extmind_memory_1:50052", False),
        ("ipv4:127.0.0.1:50052", "ipv4:127.0.0.1:50052", False),
        ("ipv4:10.0.0.1:1,10.0.0.2:50052", "ipv4:10.0.0.1:1,10.0.0.2:50052", False),
        ("IPV4:127.0.0.1:50052", "IPV4:127.0.0.1:50052", False),
        ("ipv4:///127.0.0.1:50052", "ipv4:///127.0.0.1:50052", False),
        ("ipv6:[::1]:50052,[fe80::1%eth0]:1", "ipv6:[::1]:50052,[fe80::1%eth0]:1", False),
    ],
)
def test_parse_target_takes_grpc_targets(url, target, tls):
    from extmind.channels import parse_target

    assert parse_target(url) == (target, tls)


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "is not a gRPC target"),
        ("  ", "is not a gRPC target"),
        ("localhost", "is not a gRPC target"),
        ("http//bad", "is not a gRPC target"),
        ("grpc://", "is not a gRPC target"),
        ("host:port", "is not a gRPC target"),
        ("a b:1", "is not a gRPC target"),
        ("https://x:1", "is an HTTP URL"),
        ("localhost:99999", "port 99999 is past 65535"),  # gRPC would wrap it to 34463
        ("ipv4:garbage", "'garbage' is not an address of ipv4:"),
        ("ipv4:127.0.0.1:0", "is not an address of ipv4:"),
        ("ipv4:127.0.0.1:70000", "is not an address of ipv4:"),
        ("ipv4:127.0.0.1:1,", "'' is not an address of ipv4:"),
        ("ipv4:", "'' is not an address of ipv4:"),
        ("ipv6:[::1]:x", "is not an address of ipv6:"),
        ("ipv6:127.0.0.1", "is not an address of ipv6:"),
        ("ipv4:127.0.0.1", "'127.0.0.1' is not an address of ipv4:a.b.c.d:port"),  # gRPC: "no port given"
        ("ipv4:10.0.0.1,10.0.0.2:50052", "'10.0.0.1' is not an address of ipv4:"),
        ("ipv6:::1", r"'::1' is not an address of ipv6:\[addr\]:port"),
        ("ipv6:[::1]", "is not an address of ipv6:"),
        ("ipv4:///garbage", "'garbage' is not an address of ipv4:"),
        ("ipv4:127.0.0.1:\u0665\u0660\u0660\u0665\u0661", "is not an address of ipv4:"),  # Arabic-Indic digits
    ],
)
def test_parse_target_refuses_what_grpc_would_take_for_a_host_name(url, says):
    from extmind.channels import parse_target

    with pytest.raises(ValueError, match=says):
        parse_target(url)


def test_healthcheck_says_a_url_is_invalid_not_unreachable():
    from extmind.healthcheck import check

    assert check("localhost") == check("http//memory:50052") == "INVALID_URL"
