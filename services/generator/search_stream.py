"""One SearchMemoryStream call: many KV searches on one bidirectional stream (docs/contract.md).

REMOTE retrieval searches once per layer per forward step; a unary call each time pays for a new
HTTP/2 stream, its headers, the server's per-call interceptors and access line. A stream pays
that once per generation batch. Requests are answered one response each, in order, so a batch
of requests (a prefill split to fit the response budget, several dtypes) is sent at once and
its answers read back after.

Blocking, like the unary client, and used from one thread at a time (the MLX thread). gRPC's own
thread writes the queued requests. There is no per-message deadline in gRPC: a watchdog thread
cancels the call when an answer takes longer than ``timeout`` seconds.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc

from extmind import errors
from extmind.v1 import memory_pb2

_END = object()  # queued after the last request: half-closes the stream
# Half-closed calls until the server has ended them: a call object that is garbage-collected
# earlier cancels its call, and the server would see a cancellation instead of the end.
_ENDING: set = set()


class StreamUnsupported(Exception):
    """The memory service does not implement SearchMemoryStream (UNIMPLEMENTED before any
    answer: a memory service older than the RPC). Use unary SearchMemory instead."""


class SearchStream:
    """An open SearchMemoryStream. ``search`` sends requests and returns their answers;
    ``close`` ends the stream (the server ends it with OK). After an error the stream is closed
    and every later ``search`` raises the same error."""

    def __init__(self, stub, metadata, url: str, timeout: float, error: Callable[[grpc.RpcError, str], Exception]):
        self.url = url
        self.timeout = timeout
        self.answered = 0  # requests answered so far
        self._error = error
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.SearchMemoryStream(iter(self._requests.get, _END), metadata=metadata)
        self._failed: Exception | None = None
        self._closed = threading.Event()
        self._waiting_since: float | None = None  # set while an answer is awaited (the watchdog's clock)
        self._timed_out = False
        threading.Thread(target=self._watch, name="search-stream-watchdog", daemon=True).start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def search(
        self, requests: list[memory_pb2.SearchMemoryRequest], what: str
    ) -> list[memory_pb2.SearchMemoryResponse]:
        """Sends ``requests`` and returns their answers in order. ``what`` names the search in
        errors ("searching layer 3"). Raises StreamUnsupported (nothing answered yet, the server
        lacks the RPC), else the memory service's error as ``MemoryClient``'s unary calls do."""
        if self._failed is not None:
            raise self._failed
        if self.closed:
            raise errors.FailedPrecondition("the search stream is closed")
        for r in requests:
            self._requests.put(memory_pb2.SearchMemoryStreamRequest(search=r))
        out = []
        self._waiting_since = time.monotonic()
        try:
            for _ in requests:
                out.append(next(self._call).result)
                self.answered += 1
                self._waiting_since = time.monotonic()  # each answer has the whole timeout, as a unary call
        except grpc.RpcError as e:
            self._fail(self._converted(e, what))
        except StopIteration:
            self._fail(errors.Unavailable(f"memory service at {self.url} ended the search stream early ({what})"))
        finally:
            self._waiting_since = None
        return out

    def _converted(self, e: grpc.RpcError, what: str) -> Exception:
        if self._timed_out:
            return errors.Unavailable(
                f"memory service at {self.url} is unavailable (DEADLINE_EXCEEDED: no answer within "
                f"{self.timeout:g} s, {what}); start it or point --memory-url at it"
            )
        if e.code() == grpc.StatusCode.UNIMPLEMENTED and self.answered == 0:
            return StreamUnsupported(e.details())
        return self._error(e, what)

    def _fail(self, err: Exception):
        self._failed = err
        self.close()
        raise err from None

    def close(self) -> None:
        """Ends the stream: half-closes it (the server answers OK), or cancels it after an error.
        Idempotent; any thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._requests.put(_END)
        if self._failed is not None:
            self._call.cancel()
        else:
            _ENDING.add(self._call)
            self._call.add_done_callback(_ENDING.discard)

    def _watch(self) -> None:
        # Wakes a few times per timeout: an answer late by up to a quarter of it is tolerated.
        tick = max(0.05, self.timeout / 4)
        while not self._closed.wait(tick):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.timeout:
                self._timed_out = True
                self._call.cancel()
                return
