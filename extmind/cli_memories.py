"""``extmind memorize`` (with its progress bar) and ``extmind memories list | show | delete``."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import grpc

from extmind.cli_common import TIMEOUT, CliError, Targets, UsageError, _md, _read_text, _short, counted
from extmind.v1 import common_pb2, generator_pb2, memory_pb2


class Progress:
    """Memorize progress on stderr: characters memorized out of the total (the current text
    counted by its share of tokens done), the current text's tokens done / total and its ETA.

    On a terminal one line is redrawn every 0.2 s (with a spinner); otherwise (a log, a pipe) a
    line is printed each time another 10% is done, and once at the end."""

    def __init__(self, total: int, enabled: bool, tty: bool | None = None):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.label = ""
        self.current = 0  # characters of the text being memorized now
        self.tokens = (0, 0)  # its tokens done, total
        self.eta = 0.0  # seconds left for it (0 = unknown)
        self._printed = -1  # the last 10% step printed (not a TTY)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.enabled and self.tty:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled and self.tty:
            self._thread.join()
            self._draw(final=True)
            sys.stderr.write("\n")
        elif self.enabled and exc[0] is None and self._printed < 10:  # e.g. no progress came
            self._line()

    def update(self, p) -> None:
        """Takes a MemorizeProgress of the current text."""
        self.tokens, self.eta = (p.tokens_done, p.tokens_total), p.eta_seconds
        self._step_line()

    def finish_text(self) -> None:
        self.done += self.current
        self.current, self.tokens, self.eta = 0, (0, 0), 0.0
        self._step_line()

    def _step_line(self) -> None:
        if self.enabled and not self.tty and int(self._frac() * 10) > self._printed:
            self._line()

    def _frac(self) -> float:
        done, total = self.tokens
        return min(1.0, (self.done + (self.current * done / total if total else 0)) / self.total)

    def _status(self) -> str:
        frac = self._frac()
        done, total = self.tokens
        tokens = f", this text {done}/{total} tokens" if total else ""  # chars: all texts; tokens: the current one
        eta = f" ETA {self.eta:.0f}s" if self.eta > 0 and done < total else ""
        return (
            f"{frac * 100:5.1f}% {int(frac * self.total)}/{self.total} chars{tokens} "
            f"{time.monotonic() - self._t0:6.1f}s{eta}"
        )

    def _line(self) -> None:
        self._printed = int(self._frac() * 10)
        sys.stderr.write(f"memorize {self._status()} {self.label}\n")
        sys.stderr.flush()

    def _draw(self, spin: str = "", final: bool = False):
        bar = "#" * int(self._frac() * 30)
        sys.stderr.write(f"\r[{bar:<30}] {self._status()} {spin} {_short(self.label, 30):<30}")
        sys.stderr.flush()

    def _loop(self):
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.2):
            self._draw(frames[i % 4])
            i += 1


def _chunks(text: str, limit: int) -> list[str]:
    """Split at paragraph (then sentence) boundaries into pieces of at most ~limit characters."""
    if limit <= 0 or len(text) <= limit:
        return [text]
    parts, cur = [], ""
    for para in re.split(r"(?<=\n\n)", text):
        pieces = [para] if len(para) <= limit else re.split(r"(?<=[.!?])\s+", para)
        for p in pieces:
            if cur and len(cur) + len(p) > limit:
                parts.append(cur)
                cur = ""
            cur += p if not cur or cur.endswith(("\n", " ")) else " " + p
    if cur.strip():
        parts.append(cur)
    return parts


def _memory_id(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", stem)[:100] or "memory"


ROWS_NOTE = "special tokens such as BOS are not stored"
EXCERPT_CHARS = 200


class IdleDeadline:
    """Cancels a streaming ``call`` that sends nothing for ``seconds`` (``reset()`` after every
    message); ``fired`` says whether it did."""

    def __init__(self, call, seconds: float):
        self.call, self.seconds, self.fired = call, seconds, False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        self.call.cancel()

    def reset(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self):
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _state(t: Targets, memory_id: str) -> int | None:
    """The memory's state (memory_pb2.MEMORY_STATE_*), or None when there is no such memory."""
    try:
        m = t.memory.GetMemory(memory_pb2.GetMemoryRequest(memory_id=memory_id), timeout=TIMEOUT, metadata=_md())
        return m.memory.state
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def cmd_memorize(a, t: Targets) -> int:
    jobs = []  # (memory_id, text, source)
    if a.id and len(a.files) > 1:
        raise UsageError("--id names one memory; give one file (or use --split-chars for numbered parts)")
    labels = dict(a.label or [])
    sources: dict[str, str] = {}  # memory id -> the file that gave it
    for f in a.files:  # every file is read (and checked) before the first one is memorized
        text = _read_text(f)
        if not text.strip():
            raise CliError(f"{f} is empty: nothing to memorize")
        source = "stdin" if f == "-" else Path(f).name
        base = a.id or _memory_id(Path(f).stem if f != "-" else "stdin")
        if base in sources:  # a/notes.txt and b/notes.txt: the second would be skipped or replace the first
            raise UsageError(f"{sources[base]} and {f} both give the memory id {base}: rename one")
        sources[base] = f
        parts = _chunks(text, a.split_chars)
        jobs += [(base if len(parts) == 1 else f"{base}.{i:03d}", p, source) for i, p in enumerate(parts)]
    # Existing ids are looked up before anything is memorized: one that is skipped costs no work,
    # so it is left out of the progress bar (which is not drawn at all when every id exists), and
    # one that cannot be skipped stops the command before the others are memorized.
    results = {}  # memory id -> the line to print, printed in the files' order after the bar
    todo = []  # (memory_id, text, source, exists)
    for mid, text, source in jobs:
        state = _state(t, mid)
        if state is None or a.replace:
            todo.append((mid, text, source, state is not None))
        elif state != memory_pb2.MEMORY_STATE_READY:
            raise CliError(
                f"memory {mid} exists but is not READY: being built, or an interrupted memorize still "
                "stopping (it deletes the memory within seconds: run this again then), or left half-built "
                "by a generator that died: `extmind memorize --replace` builds it again"
            )
        else:
            results[mid] = _skipped(mid)
    try:
        with Progress(sum(len(p) for _, p, _, _ in todo), enabled=bool(todo) and not a.quiet) as bar:
            for mid, text, source, exists in todo:
                bar.label, bar.current = mid, len(text)
                results[mid] = _memorize_one(t, mid, text, {"source": source, **labels}, exists, bar)
                bar.finish_text()
    finally:  # also the lines of those done before a failure
        for mid, _, _ in jobs:
            if mid in results:
                print(results[mid])
    return 0


def _skipped(mid: str) -> str:
    return f"{mid}: exists already, skipped (--replace memorizes it again)"


def _memorize_one(t: Targets, mid: str, text: str, labels: dict, exists: bool, bar: Progress) -> str:
    """Memorizes ``text`` as ``mid`` (deleting it first when it ``exists``: --replace), streaming
    its progress into ``bar`` -> the line to print."""
    if exists:
        t.memory.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=mid), timeout=TIMEOUT, metadata=_md())
    # The text itself is not stored (only token ids, and no service detokenizes): keep how it
    # starts, for `extmind memories show`.
    labels = {"excerpt": _short(text, EXCERPT_CHARS), **labels}
    req = generator_pb2.MemorizeRequest(text=text, memory_id=mid, labels=labels)
    r = None
    # No deadline on the whole call: a long text takes many windows (minutes on a CPU). The
    # progress messages show it is alive; silence for TIMEOUT seconds ends it.
    call = t.generator.MemorizeStream(generator_pb2.MemorizeStreamRequest(request=req), metadata=_md())
    idle = IdleDeadline(call, TIMEOUT)
    try:
        with idle:
            for ev in call:
                idle.reset()
                if ev.HasField("progress"):
                    bar.update(ev.progress)
                else:
                    r = ev.done
    except grpc.RpcError as e:
        if idle.fired:
            raise CliError(
                f"the generator sent no progress on {mid} for {TIMEOUT:g}s (EXTMIND_CLI_TIMEOUT), so the "
                "memorize was cancelled and the generator drops what it had built"
            ) from None
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # made meanwhile by someone else
            raise
        return _skipped(mid)
    if r is None:
        raise CliError(f"the generator ended memorizing {mid} without a result; see its log")
    return f"{r.memory_id}: {counted(r.num_tokens, 'token')}, {counted(r.num_rows, 'memory row')} ({ROWS_NOTE})"


def _fmt_memory(m) -> str:
    state = memory_pb2.MemoryState.Name(m.state).removeprefix("MEMORY_STATE_")
    created = m.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if m.create_time.seconds else "-"
    return (
        f"{m.memory_id:<32} {state:<8} {m.num_tokens:>7} {m.bytes / 1e6:>9.2f}  {created}  {m.model_fingerprint[:16]}"
    )


def cmd_memories(a, t: Targets) -> int:
    if a.mem_cmd == "list":
        token = ""
        while True:
            r = t.memory.ListMemories(
                memory_pb2.ListMemoriesRequest(model_fingerprint=a.fingerprint or "", page_token=token),
                timeout=TIMEOUT,
                metadata=_md(),
            )
            if not token:  # the header once the service answered (an error stays one line)
                print(f"{'MEMORY':<32} {'STATE':<8} {'ROWS':>7} {'MB':>9}  {'CREATED':<19}  FINGERPRINT")
            for m in r.memories:
                print(_fmt_memory(m))
            token = r.next_page_token
            if not token:
                break
    elif a.mem_cmd == "show":
        m = t.memory.GetMemory(
            memory_pb2.GetMemoryRequest(memory_id=a.memory_id, include_tokens=a.tokens), timeout=TIMEOUT, metadata=_md()
        ).memory
        lay = m.layout
        labels = dict(m.labels)
        excerpt = labels.pop("excerpt", "")
        print(f"memory       {m.memory_id}")
        print(f"state        {memory_pb2.MemoryState.Name(m.state).removeprefix('MEMORY_STATE_')}")
        # The note about memorize's count only where memorize made it (it keeps the excerpt): a
        # memory written from token ids by another client has a row for every id it was given.
        note = f"; {ROWS_NOTE}, so `extmind memorize` counted more tokens" if excerpt else ""
        print(f"rows         {m.num_tokens} (one per stored token{note})")
        dtype = common_pb2.DType.Name(lay.dtype).removeprefix("DTYPE_").lower()
        print(f"layout       {lay.num_layers} layers x {lay.num_kv_heads} KV heads x {lay.head_dim} dims, {dtype}")
        print(f"bytes        {m.bytes}")
        print(f"fingerprint  {m.model_fingerprint}")
        print(f"labels       {', '.join(f'{k}={v}' for k, v in sorted(labels.items())) or '-'}")
        if excerpt:
            print(f"excerpt      {excerpt}")
        else:
            print(
                "excerpt      - (not memorized by this CLI; the memory keeps token ids only and no service "
                "turns them back into text: --tokens prints them)"
            )
        if a.tokens:
            print(f"token_ids    {list(m.token_ids)}")
    else:
        for memory_id in a.memory_ids:  # an error stops here: the ids before it are deleted (printed)
            t.memory.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=memory_id), timeout=TIMEOUT, metadata=_md())
            print(f"deleted {memory_id}", flush=True)
    return 0
