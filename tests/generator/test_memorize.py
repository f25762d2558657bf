"""Memorize failing mid-stream: the caller gets the failure itself and nothing half-built stays."""

from __future__ import annotations

import time

import pytest

from extmind import errors
from extmind.v1 import memory_pb2
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_client import MemoryClient

# ~40 tokens: with window 8 / stride 4, several windows, so rows of the first ones are already
# streamed when a later window fails (make_cache + 2 prefill chunks per window).
CAPITALS = (
    "Paris is the capital of France. Berlin is the capital of Germany. "
    "Rome is the capital of Italy. Madrid is the capital of Spain."
)


# The builder's MLX call that runs a prefill chunk of the third window (make_cache + 2 chunks per
# window): the first windows' rows are streamed by then.
THIRD_WINDOW_CALL = 7


def _before_call(builder, n: int, action):
    """Makes ``builder`` run ``action()`` before its ``n``-th call on the MLX thread (an exception
    of ``action`` is that call's). -> (the real ``run``, to put back; the calls so far)."""
    real_run, calls = builder.run, []

    def run(fn, *args):
        calls.append(fn)
        if len(calls) == n:
            action()
        return real_run(fn, *args)

    builder.run = run
    return real_run, calls


def _windowed_engine(llama_path, memory_address) -> GeneratorEngine:
    engine = GeneratorEngine(
        EngineConfig(model=str(llama_path), memory_url=memory_address, window=8, stride=4, prefill_step_size=4)
    )
    engine.start()
    return engine


@pytest.fixture(scope="module")
def memory_address(module_memory_service):
    return module_memory_service.address


async def test_a_window_failing_mid_stream_deletes_the_memory(llama_path, memory_address):
    engine = _windowed_engine(llama_path, memory_address)
    client = MemoryClient(memory_address)
    try:
        tokens = engine.tokenizer.encode(CAPITALS)
        builder = engine._builder

        def fall_over():
            raise errors.Internal("the device fell over")

        real_run, calls = _before_call(builder, THIRD_WINDOW_CALL, fall_over)
        with pytest.raises(errors.Internal, match="the device fell over"):
            await engine.memorize(tokens, memory_id="half-built")
        assert len(calls) == THIRD_WINDOW_CALL
        with pytest.raises(errors.NotFound):
            client.get_memory("half-built")
        builder.run = real_run
        out = await engine.memorize(tokens, memory_id="half-built")  # the id is free again
        assert out["num_rows"] == len(tokens) - 1
        assert client.get_memory("half-built").state == memory_pb2.MEMORY_STATE_READY
    finally:
        client.close()
        engine.stop()


async def test_a_cancelled_memorize_leaves_no_half_built_memory(llama_path, memory_address):
    """A unary Memorize whose caller goes away (cancel, deadline) stops building and deletes what
    it had stored: the id is free again, not stuck BUILDING behind ALREADY_EXISTS."""
    import asyncio

    engine = GeneratorEngine(
        EngineConfig(model=str(llama_path), memory_url=memory_address, window=8, stride=4, prefill_step_size=4)
    )
    engine.start()
    client = MemoryClient(memory_address)
    try:
        tokens = engine.tokenizer.encode(" ".join(["Paris is the capital of France."] * 60))
        task = asyncio.ensure_future(engine.memorize(tokens, memory_id="cancelled"))
        for _ in range(200):  # until its first rows are in the memory service
            await asyncio.sleep(0.02)
            try:
                if client.get_memory("cancelled").state == memory_pb2.MEMORY_STATE_BUILDING:
                    break
            except errors.NotFound:
                pass
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.05)
            try:
                client.get_memory("cancelled")
            except errors.NotFound:
                break
        with pytest.raises(errors.NotFound):
            client.get_memory("cancelled")
        out = await engine.memorize(tokens[:20], memory_id="cancelled")  # the id is free again
        assert out["memory_id"] == "cancelled"
    finally:
        client.close()
        engine.stop()


async def test_windows_fit_in_the_models_context(tmp_path, memory_address):
    from extmind.tiny_models import build_llama

    # A model of 32 positions under the default window (3072): the windows are capped at 32.
    path = build_llama(
        tmp_path / "short", hidden=64, layers=2, heads=4, kv_heads=2, rope_scaling=None, max_position=32, seed=3
    )
    engine = GeneratorEngine(EngineConfig(model=str(path), memory_url=memory_address))
    engine.start()
    try:
        ok = [t for t in range(engine.vocab_size) if t not in engine.special_ids]
        tokens = [ok[i % 50] for i in range(70)]
        reports = []
        out = engine.memorize_blocking(tokens, progress=reports.append)
        assert reports and reports[-1].windows_total == 3  # [0, 32), [32, 64), [64, 70)
        assert out["num_rows"] == 70
        await engine.delete_memory(out["memory_id"])

        with pytest.raises(errors.InvalidArgument, match="window 64 exceeds the model's context of 32"):
            engine.memorize_blocking(tokens, window=64)
    finally:
        engine.stop()


def test_a_slow_first_window_is_not_reaped(llama_path, memory_service_factory):
    # The memory service reaps a BUILDING memory no stream holds after MEMORY_BUILDING_TTL; a
    # stream holds it from its first message. The first rows come only after the first window's
    # forward (seconds on a busy CPU): the stream must name the memory before that forward.
    svc = memory_service_factory(env={"MEMORY_BUILDING_TTL": "0.3"})
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=svc.address))
    engine.start()
    try:
        run = engine._builder.run

        def slow(fn, *args):  # every prefill chunk waits past the TTL and a few sweeps
            time.sleep(1.0)
            return run(fn, *args)

        engine._builder.run = slow
        out = engine.memorize_blocking(list(range(5, 45)))
        assert engine.memory.get_memory(out["memory_id"]).state == memory_pb2.MEMORY_STATE_READY
    finally:
        engine.stop()


async def test_a_failed_memorizes_clean_up_spares_a_memory_created_again_under_its_id(llama_path, memory_address):
    """Another client deletes the half-built memory and creates its own under the same id while
    the Memorize fails: the failed Memorize's clean-up deletes only the memory it created (by its
    create_time), so the other client's memory stays."""
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address, window=8, stride=4))
    engine.start()
    other = MemoryClient(memory_address)
    try:
        tokens = engine.tokenizer.encode("Paris is the capital of France. Berlin is the capital of Germany.")
        builder = engine._builder
        real_append = builder.client.append

        def append_then_lose_the_id(requests, timeout=None):
            mine = other.get_memory("contested")
            other.delete_memory("contested")
            theirs = other.create_memory(
                memory_id="contested",
                layout=mine.layout,
                fingerprint="another-model",
                token_ids=[1, 2],
                positions=[],
                labels={},
            )
            append_then_lose_the_id.theirs = theirs
            raise errors.Internal("the device fell over")

        builder.client.append = append_then_lose_the_id
        with pytest.raises(errors.Internal, match="the device fell over"):
            await engine.memorize(tokens, memory_id="contested")
        builder.client.append = real_append
        kept = other.get_memory("contested")
        assert kept.model_fingerprint == "another-model"
        assert kept.create_time == append_then_lose_the_id.theirs.create_time
    finally:
        other.close()
        engine.stop()


@pytest.mark.parametrize("loading", [False, True], ids=["back_at_once", "back_after_loading"])
def test_a_memorize_cut_off_by_the_memory_service_is_deleted_once_it_is_back(
    llama_path, memory_service_factory, redis_server, loading
):
    """The memory service dies mid-append: the caller gets UNAVAILABLE at once, and the half-built
    memory (BUILDING, in Redis) is deleted once the service is back, so that the retry the status
    invites finds the id free, not ALREADY_EXISTS until the reaper's MEMORY_BUILDING_TTL. ``loading``:
    the service comes back while Redis is still down, its port open but every call UNAVAILABLE
    ("loading") for a while: the clean-up keeps trying."""
    svc = memory_service_factory()
    engine = _windowed_engine(llama_path, svc.address)
    client = MemoryClient(svc.address)
    try:
        tokens = engine.tokenizer.encode(CAPITALS)
        builder = engine._builder

        def crash_mid_stream():  # the first windows' rows are stored
            assert client.get_memory("cut-off").state == memory_pb2.MEMORY_STATE_BUILDING
            svc.kill()
            if loading:
                redis_server.stop()

        real_run, _ = _before_call(builder, THIRD_WINDOW_CALL, crash_mid_stream)
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            engine.memorize_blocking(tokens, memory_id="cut-off")
        assert time.monotonic() - t0 < 30  # not held until the service is back
        builder.run = real_run
        if loading:
            svc.spawn()  # the same port: open, answering "loading" while it waits for Redis
            time.sleep(3.0)  # the clean-up meets the loading service (the old code gave up here)
            redis_server.start()
            svc.wait_ready()
        else:
            svc.start()  # the same port and Redis: the half-built memory is still there, BUILDING
        deadline = time.monotonic() + 60
        while True:
            try:
                state = client.get_memory("cut-off").state
            except errors.NotFound:
                break
            except errors.Unavailable:  # the client's channel reconnecting
                state = None
            assert time.monotonic() < deadline, f"the half-built memory is still there ({state})"
            time.sleep(0.1)
        out = engine.memorize_blocking(tokens, memory_id="cut-off")  # the id is free again
        assert out["num_rows"] == len(tokens) - 1
        assert client.get_memory("cut-off").state == memory_pb2.MEMORY_STATE_READY
    finally:
        client.close()
        engine.stop()
