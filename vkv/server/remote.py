# SPDX-License-Identifier: Apache-2.0
"""The engines in a process of their own (`vkv serve --engine-process`): the HTTP server's Python (parsing, SSE
events, metrics) then takes no GIL from the thread that steps the engines, and cannot delay a step's launches.

The engine process builds the engines (:func:`vkv.server.launch.build_engines`), steps them with an EngineGroup,
and sends each batch of outputs over a pipe; the server's process holds a :class:`RemoteGroup` of
:class:`RemoteEngine` proxies, which the app uses as it would engines: requests and aborts go over the pipe (a
request's refusal comes back at once, as InvalidRequestError), outputs reach each request's ``on_output`` from a
thread that reads the pipe. If the engine process dies, every live request ends with "error" and /health says why.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from vkv.allocator import InvalidRequestError, OutOfPagesError
from vkv.engine import EngineGroup, SamplingParams
from vkv.engine.engine import encode_prompt
from vkv.engine.request import RequestOutput

REPLY_TIMEOUT_S = 60.0
ERRORS = {"InvalidRequestError": InvalidRequestError, "OutOfPagesError": OutOfPagesError}


class EngineProcessError(RuntimeError):
    """The engine process has failed or exited; or what its engines' loop caught (``str``: the original type and
    message)."""


def _stop(conn, lock: threading.Lock, process, timeout_s: float = 30.0) -> None:
    """Ask the engine process to stop, wait up to ``timeout_s``, then kill it (close(); at exit, a forgotten one)."""
    if process.is_alive():
        with contextlib.suppress(OSError, ValueError), lock:
            conn.send(("stop",))
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(10)


class _Submitted:
    """What add_request returns here: the prompt's ids (the app reads their number)."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids


class RemoteEngine:
    """One model of the engine process, as the app sees it."""

    def __init__(self, group: RemoteGroup, info: dict[str, Any]):
        self.owner, self.group = group, None  # group: no EngineGroup of this process steps it
        self.name, self.max_seq_len, self.vocab_size = info["name"], info["max_seq_len"], info["vocab_size"]
        self.tokenizer, self.budget_bytes, self.warm_up_s = info["tokenizer"], info["budget_bytes"], info["warm_up_s"]

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.name)

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, request_id: str,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> _Submitted:  # fmt: skip
        ids = self.encode(prompt)
        key = (self.name, str(request_id))
        self.owner.listen(key, on_output)
        try:
            self.owner.call("add", self.name, key[1], ids, params)
        except BaseException:
            self.owner.unlisten(key, on_output)
            if isinstance(sys.exc_info()[1], TimeoutError):  # it may come in yet: nobody would read it
                self.abort(key[1])
            raise
        return _Submitted(ids)

    def abort(self, request_id: str) -> None:
        if self.owner._gone is None:
            with contextlib.suppress(OSError):  # the engine process is going: its requests end anyway
                self.owner.send("abort", self.name, str(request_id))

    def stats(self) -> dict[str, Any]:
        return self.owner.call("stats", self.name)


class RemoteGroup:
    """The engine process and its engines' proxies; ``close()`` stops it (its engines close, their pages go back)."""

    def __init__(self, specs: list[str], build_args: dict[str, Any], start_timeout_s: float = 1800.0):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_engine_process, args=(child, specs, build_args), name="vkv-engines")
        self.process.start()
        child.close()
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._calls, self._replies, self._ids = {}, {}, itertools.count()
        self._listeners: dict[tuple[str, str], Callable[[RequestOutput], None]] = {}  # (model, request id)
        self._gone: BaseException | None = None  # the engine process has exited: why
        try:
            if not self._conn.poll(start_timeout_s):
                raise TimeoutError(f"the engine process was not ready within {start_timeout_s:.0f} s")
            kind, payload = self._conn.recv()
        except EOFError:  # it died before it could say why (a crash, a signal)
            self.process.join(10)
            code = self.process.exitcode
            raise EngineProcessError(f"the engine process exited before it was ready (code {code})") from None
        except BaseException:
            self.process.kill()
            self.process.join(10)
            raise
        if kind != "ready":  # the engines could not be built: the process has exited, with this reason
            self.process.join(10)
            raise ERRORS.get(payload[0], EngineProcessError)(payload[1])
        self.engines = [RemoteEngine(self, info) for info in payload]
        self._reader = threading.Thread(target=self._read, name="vkv-engine-pipe", daemon=True)
        self._reader.start()
        # forgotten (no close()): the engine process is told to stop at exit, which would otherwise wait for it
        self._finalizer = weakref.finalize(self, _stop, self._conn, self._send_lock, self.process)

    def start(self) -> None:  # the engine process steps its engines already (the app's lifespan calls these)
        pass

    def stop(self) -> None:
        pass

    def budgets(self) -> dict[str, int]:
        return self.call("budgets")

    @property
    def error(self) -> BaseException | None:
        """Why the engine process exited, or the last failure its engines' loop caught (/health); None if none."""
        if self._gone is not None:
            return self._gone
        why = self.call("error")
        return None if why is None else EngineProcessError(why)

    def listen(self, key: tuple[str, str], on_output: Callable[[RequestOutput], None] | None) -> None:
        """Route the outputs of request ``key`` (model, request id) to ``on_output``; a key in use is refused."""
        with self._lock:
            if self._gone is not None:
                raise EngineProcessError(str(self._gone))
            if key in self._listeners:
                raise InvalidRequestError(f"request id {key[1]!r} is in use")
            self._listeners[key] = on_output

    def unlisten(self, key: tuple[str, str], on_output: Callable[[RequestOutput], None] | None) -> None:
        with self._lock:
            if key in self._listeners and self._listeners[key] is on_output:
                del self._listeners[key]

    def send(self, *message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)

    def call(self, *message: Any) -> Any:
        """Send ``message`` with a call id; the engine process's answer (its refusal raised here)."""
        if threading.current_thread() is self._reader:  # from a listener: only this thread could read the answer
            raise InvalidRequestError("a request to the engine process from an on_output listener would wait forever")
        done = threading.Event()
        with self._lock:
            if self._gone is not None:
                raise EngineProcessError(str(self._gone))
            call = next(self._ids)
            self._calls[call] = done
        try:
            self.send(message[0], call, *message[1:])
            if not done.wait(REPLY_TIMEOUT_S):
                raise TimeoutError(f"the engine process did not answer {message[0]!r} within {REPLY_TIMEOUT_S:.0f} s")
        finally:
            with self._lock:
                self._calls.pop(call, None)
                ok, value = self._replies.pop(call, (False, ("", f"no answer: {self._gone}")))
        if not ok:
            raise ERRORS.get(value[0], EngineProcessError)(value[1])
        return value

    def _read(self) -> None:
        """The pipe's reader: outputs to their requests' listeners, answers to their callers."""
        try:
            while True:
                kind, *rest = self._conn.recv()
                if kind == "outputs":
                    for name, output in rest[0]:
                        with self._lock:
                            pick = self._listeners.pop if output.finished else self._listeners.get
                            listener = pick((name, output.request_id), None)
                        if listener is not None:
                            with contextlib.suppress(Exception):  # a listener's failure is its own
                                listener(output)
                else:  # "reply"
                    call, ok, value = rest
                    with self._lock:
                        done = self._calls.get(call)
                        if done is not None:  # else its caller gave up waiting
                            self._replies[call] = (ok, value)
                    if done is not None:
                        done.set()
        except BaseException as exc:  # noqa: BLE001 - the engine process has gone (close(), or it died), or worse
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._gone = self._gone or EngineProcessError(f"the engine process has exited ({type(exc).__name__})")
            listeners, self._listeners = self._listeners, {}
            waiting = list(self._calls.values())
        for done in waiting:
            done.set()
        why = str(self._gone)
        for (_, request_id), listener in listeners.items():
            with contextlib.suppress(Exception):
                listener(RequestOutput(request_id, [], True, "error", 0, 0, why))

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the engine process: its engines finish their requests with "abort" and give their pages back."""
        self._finalizer.detach()
        _stop(self._conn, self._send_lock, self.process, timeout_s)
        self._reader.join(10)  # it reads the end of the pipe, then fails what is left
        self._conn.close()


class _Outbox:
    """The engine process's side of the outputs: the engines' thread adds them, a thread of its own sends what has
    gathered (a step's outputs in one message, mostly)."""

    def __init__(self, send: Callable[..., None]):
        self.send, self.cond, self.items, self.closed = send, threading.Condition(), [], False
        self.thread = threading.Thread(target=self._run, name="vkv-outbox", daemon=True)
        self.thread.start()

    def post(self, name: str, output: RequestOutput) -> None:
        with self.cond:
            self.items.append((name, output))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.items or self.closed)
                items, self.items = self.items, []
                closed = self.closed
            if items:
                self.send("outputs", items)
            if closed:
                return

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(10)


def _engine_process(conn, specs: list[str], build_args: dict[str, Any]) -> None:
    """The engine process: build the engines, say ready (or why not), then serve the pipe's messages until "stop"
    or the server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle: it then sends "stop"
    from vkv.server.launch import build_engines, close_engines, freeze_heap, log_to_stderr

    log_to_stderr()

    lock = threading.Lock()

    def send(*message: Any) -> None:
        with lock:
            conn.send(message)

    engines = []
    try:  # (on the CPU, TRITON_INTERPRET came in the environment: it must be set before the kernels load)
        engines = build_engines(specs, **build_args)
        warm = [engine.warm_up() for engine in engines]
        freeze_heap()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which raises it
        close_engines(engines)
        send("failed", _described(exc))
        return
    by_name = {engine.name: engine for engine in engines}
    group, outbox = EngineGroup(engines), _Outbox(send)
    info = [
        {"name": e.name, "max_seq_len": e.max_seq_len, "vocab_size": e.vocab_size, "tokenizer": e.tokenizer,
         "budget_bytes": e.pool.stats().budget_bytes, "warm_up_s": w}
        for e, w in zip(engines, warm, strict=True)
    ]  # fmt: skip
    try:
        send("ready", info)
        group.start()
        while True:
            kind, *rest = conn.recv()
            if kind == "stop":
                break
            if kind == "abort":
                if rest[0] in by_name:
                    by_name[rest[0]].abort(rest[1])
                continue
            call, args = rest[0], rest[1:]
            try:
                if kind == "add":
                    name, request_id, ids, params = args
                    listener = functools.partial(outbox.post, name)
                    by_name[name].add_request(ids, params, request_id=request_id, on_output=listener)
                    value = None
                elif kind == "stats":
                    value = by_name[args[0]].stats()
                elif kind == "error":  # the last failure the engines' loop caught (/health)
                    value = None if group.error is None else f"{type(group.error).__name__}: {group.error}"
                else:  # "budgets"
                    value = group.budgets()
                send("reply", call, True, value)
            except Exception as exc:  # noqa: BLE001 - the caller raises it
                send("reply", call, False, _described(exc))
    except (EOFError, OSError):  # the server has gone
        pass
    finally:
        group.stop()
        close_engines(engines)
        outbox.close()


def _described(exc: Exception) -> tuple[str, str]:
    """(type name, message) of an error for the server's side, which raises the same type for ERRORS' and an
    EngineProcessError (whose message keeps the type's name) for others."""
    name = type(exc).__name__
    return name, str(exc) if name in ERRORS else f"{name}: {exc}"
