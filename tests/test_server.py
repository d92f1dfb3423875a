# SPDX-License-Identifier: Apache-2.0
"""`vkv serve` over a real loopback HTTP connection (uvicorn on 127.0.0.1), with the openai client and httpx.

Two random tiny models (vkv.engine.presets: tiny-llama, tiny-qwen3, with a word tokenizer) share one pool on the
CPU (host backend, Triton's interpreter). Outputs are checked against transformers' generate() on the same
weights; bad requests, disconnects and a bounded load (64 clients for 20 s) must leave no request or page behind.
"""

import copy
import json
import random
import re
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from vkv import InvalidRequestError  # noqa: E402
from vkv.engine import SamplingParams  # noqa: E402
from vkv.server import create_app  # noqa: E402
from vkv.server.launch import build_engines  # noqa: E402

MODELS = ["random:tiny-llama", "qwen=random:tiny-qwen3"]


@pytest.fixture(scope="module")
def server():
    engines = build_engines(
        MODELS, budget_bytes=16 << 20, device="cpu", max_num_seqs=64, max_seq_len=256, max_num_batched_tokens=512
    )
    for engine in engines:
        engine.idle_release_s = 0.5
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(engines), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield url, {e.name: e for e in engines}
    uv.should_exit = True
    thread.join(30)
    for engine in engines:
        engine.close()
    engines[0].pool.close()


def _client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def _expected(engine, prompt_ids: list[int], new: int) -> list[int]:
    """transformers' greedy generate() on a copy of the engine's weights, with sdpa."""
    reference = copy.deepcopy(engine.model)
    reference.set_attn_implementation("sdpa")
    out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def _idle(engines, timeout_s: float = 30) -> None:
    """Wait until no request is live and every slot is free."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not e.has_work() and e.kv.stats().slots_in_use == 0 for e in engines.values()):
            return
        time.sleep(0.05)
    raise AssertionError({n: (e.stats(), e.kv.stats().slots_in_use) for n, e in engines.items()})


def test_models_health_and_metrics(server):
    url, engines = server
    assert [m.id for m in _client(url).models.list().data] == ["tiny-llama", "qwen"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("vkv_kv_mapped_bytes", "vkv_kv_in_use_bytes", "vkv_requests_running", "vkv_requests_waiting"):
        assert f'{name}{{model="tiny-llama"}}' in metrics and f'{name}{{model="qwen"}}' in metrics
    assert 'vkv_kv_device_full{model="qwen"} 0.0' in metrics  # the device never ran out here
    assert 'vkv_forward_out_of_memory{model="qwen"} 0.0' in metrics
    assert 'vkv_torch_peak_reserved_bytes{model="qwen"} 0.0' in metrics  # the models are on the CPU
    assert "vkv_time_to_first_token_seconds_bucket" in metrics or "vkv_time_to_first_token_seconds" in metrics


@pytest.mark.cpu_kernels
def test_completions_equal_generate_streamed_or_not(server):
    url, engines = server
    client = _client(url)
    for name, prompt in (("tiny-llama", [5, 6, 7, 8]), ("qwen", list(range(20, 45)))):
        want = _expected(engines[name], prompt, 8)
        done = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        choice = done.choices[0]
        assert choice.token_ids == want and choice.finish_reason == "length"
        assert choice.text == engines[name].tokenizer.decode(want)
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), 8)
        chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert [t for c in chunks for t in c.choices[0].token_ids] == want
        assert "".join(c.choices[0].text for c in chunks) == choice.text
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    _idle(engines)


@pytest.mark.cpu_kernels
def test_chat_text_and_stop_strings(server):
    url, engines = server
    client = _client(url)
    engine = engines["qwen"]
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    want = _expected(engine, prompt, 10)
    reply = client.chat.completions.create(model="qwen", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == engine.tokenizer.decode(want)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 10
    streamed = client.chat.completions.create(
        model="qwen", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    words = reply.choices[0].message.content.split(" ")
    stop = words[3]
    cut = reply.choices[0].message.content[: reply.choices[0].message.content.index(stop)]
    for stream in (False, True):
        out = client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=10, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(out)
            got, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert (got, reason) == (cut, "stop")
    seeded = {"model": "tiny-llama", "prompt": "w7 w8", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    first, again = (client.completions.create(**seeded).choices[0].token_ids for _ in range(2))
    assert first == again
    _idle(engines)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "nope", "prompt": "w1"}, 404, "model 'nope' is not served here"),
        ({"model": "qwen", "prompt": [1, 2, 500]}, 400, "token id 500 is not in the vocabulary"),
        ({"model": "qwen", "prompt": list(range(120)) * 3}, 400, "the prompt has 360 tokens; this model's max_seq_len"),
        ({"model": "qwen", "prompt": "w1", "n": 2}, 400, "n must be 1"),
        ({"model": "qwen", "prompt": [1] * 200, "max_tokens": 60}, 400, "asks for 260 .200 in the prompt, 60 to"),
        ({"model": "qwen", "prompt": "w1", "logprobs": 2}, 400, "logprobs is not supported"),
        ({"model": "qwen", "prompt": "w1", "top_p": 1.5}, 400, r"top_p must be a number in \(0, 1\]"),
        ({"model": "qwen", "prompt": "w1", "max_tokens": 0}, 400, "max_tokens must be an int >= 1"),
        ({"model": "qwen", "prompt": {"a": 1}}, 400, "prompt must be a string or a list of token ids"),
        ({"model": "qwen", "prompt": ""}, 400, "the prompt is empty"),
        ({"model": "qwen", "messages": [{"role": "user"}]}, 400, "messages must be a non-empty list"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, message):
    url, engines = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(message, error["message"]), error["message"]
    assert not engines["qwen"].has_work()


def test_bad_json_and_the_openai_client_error(server):
    url, engines = server
    reply = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        _client(url).completions.create(model="qwen", prompt=[999], max_tokens=2)


@pytest.mark.cpu_kernels
def test_a_client_that_goes_away_frees_its_slot(server):
    url, engines = server
    body = {"model": "tiny-llama", "prompt": "w1 w2", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
        lines = reply.iter_lines()
        got = [line for line in (next(lines) for _ in range(4)) if line.startswith("data:")]
        assert got and json.loads(got[0][5:])["choices"][0]["token_ids"]
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up before the 200 tokens
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    _idle(engines)
    finished = httpx.get(f"{url}/metrics").text
    assert 'vkv_requests_finished_total{model="tiny-llama",reason="abort"} 2.0' in finished


@pytest.mark.cpu_kernels
def test_64_clients_for_20_seconds(server):
    """A bounded load on loopback: 64 threads, each sending requests (streaming or not, 1-24 prompt tokens, 1-6
    new) until 20 s are up. No error; afterwards no request, slot or page is left (idle models trim)."""
    url, engines = server
    errors, counts, stop = [], [0] * 64, time.monotonic() + 20

    def client(i: int) -> None:
        rng, c = random.Random(i), _client(url)
        while time.monotonic() < stop:
            name = rng.choice(["tiny-llama", "qwen"])
            prompt = [rng.randrange(128) for _ in range(rng.randint(1, 24))]
            new = rng.randint(1, 6)
            try:
                if rng.random() < 0.5:
                    out = c.completions.create(model=name, prompt=prompt, max_tokens=new, temperature=0)
                    assert out.choices[0].finish_reason == "length" and len(out.choices[0].token_ids) == new
                else:
                    chunks = list(c.completions.create(model=name, prompt=prompt, max_tokens=new, stream=True))
                    assert sum(len(ch.choices[0].token_ids) for ch in chunks) == new
                counts[i] += 1
            except Exception as exc:  # noqa: BLE001 - collected, the test fails on any
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert sum(counts) >= 64 and all(t.is_alive() is False for t in threads)
    _idle(engines)
    time.sleep(1.5)  # past idle_release_s: every kept page goes back to the pool
    pool = next(iter(engines.values())).pool
    assert all(e.kv.stats().mapped_pages == 0 for e in engines.values()) and pool.stats().in_use == 0
    print(f"\n64 clients, 20 s: {sum(counts)} requests")


def test_pools_shared_split_or_on_a_ledger(tmp_path):
    page = 1 << 16
    shared = build_engines(["random:tiny-llama", "b=random:tiny-llama"], budget_bytes=16 * page, page_size=page,
                           device="cpu", max_seq_len=64)  # fmt: skip
    split = build_engines(["random:tiny-llama", "b=random:tiny-llama"], budget_bytes=16 * page, page_size=page,
                          device="cpu", max_seq_len=64, partition=True)  # fmt: skip
    path = str(tmp_path / "ledger")
    first = build_engines(["random:tiny-llama"], budget_bytes=16 * page, page_size=page, device="cpu",
                          max_seq_len=64, ledger=path)  # fmt: skip
    second = build_engines(["b=random:tiny-llama"], page_size=page, device="cpu", max_seq_len=64, ledger=path)
    try:
        assert shared[0].pool is shared[1].pool and shared[0].pool.stats().budget_pages == 16
        assert split[0].pool is not split[1].pool and [e.pool.stats().budget_pages for e in split] == [8, 8]
        assert first[0].pool.ledger is not None and second[0].pool.stats().budget_pages == 16  # the file's budget
        assert {e.name for e in first[0].pool.ledger.entries()} == {"tiny-llama", "b"}
        with pytest.raises(Exception, match="partition .* and ledger"):
            build_engines(["random:tiny-llama"], device="cpu", partition=True, ledger=path)
    finally:
        for engines in (shared, split, first, second):
            for engine in engines:
                engine.close()
            for pool in {id(e.pool): e.pool for e in engines}.values():
                pool.close()


def test_the_mailbox_wakes_the_loop_once_for_what_arrived_together():
    """Outputs posted from another thread (the engine's) while the loop is busy reach their queues in order, with
    one wake-up of the loop for all of them; a post after that wakes it again."""
    import asyncio

    from vkv.server.app import Mailbox

    async def main() -> tuple[list[int], list[int], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        original = loop.call_soon_threadsafe

        def counted(callback, *args):
            nonlocal wakes
            wakes += 1
            return original(callback, *args)

        loop.call_soon_threadsafe = counted
        mailbox, a, b = Mailbox(loop), asyncio.Queue(), asyncio.Queue()
        poster = threading.Thread(target=lambda: [mailbox.post(q, i) for i, q in enumerate([a, b, a, b, a])])
        poster.start()
        poster.join()  # the loop ran nothing meanwhile: one wake-up is pending for the five
        await asyncio.sleep(0.01)
        first = wakes
        threading.Thread(target=mailbox.post, args=(b, 5)).start()
        got_b = [await asyncio.wait_for(b.get(), 5) for _ in range(3)]
        return [a.get_nowait() for _ in range(3)], got_b, first

    got_a, got_b, first_wakes = asyncio.run(main())
    assert got_a == [0, 2, 4] and got_b == [1, 3, 5] and first_wakes == 1


@pytest.mark.cpu_kernels
def test_the_engines_in_a_process_of_their_own():
    """`vkv serve --engine-process` (RemoteGroup): the same API over engines stepped by another process. Greedy
    tokens, streamed or not, equal transformers' generate() on the same seeded weights; a prompt that can never fit
    gets 400 at once; /health and /metrics answer from the engine process; a client that goes away frees its slot
    there; close() stops the process (its pages go back), and a request that still runs ends with an error."""
    from vkv.server.remote import EngineProcessError, RemoteGroup

    args = {"budget_bytes": 16 << 20, "device": "cpu", "max_num_seqs": 8, "max_seq_len": 128}
    with pytest.raises(InvalidRequestError, match="two models have one name"):  # the engine process's refusal
        RemoteGroup(["a=random:tiny-llama", "a=random:tiny-qwen3"], args)
    group = RemoteGroup(["random:tiny-llama"], args)
    local = build_engines(["random:tiny-llama"], **args)[0]  # the same seeded random weights: the reference
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(group), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        client, prompt = _client(url), [5, 6, 7, 8, 9]
        want = _expected(local, prompt, 8)
        done = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
        assert done.choices[0].token_ids == want and done.choices[0].finish_reason == "length"
        chunks = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        assert [t for c in chunks for t in c.choices[0].token_ids] == want
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": [1] * 200}, timeout=60)  # refused there
        assert refused.status_code == 400 and "max_seq_len is 128" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        body = {"model": "tiny-llama", "prompt": "w1 w2", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
            lines = reply.iter_lines()
            assert any(line.startswith("data:") for line in (next(lines) for _ in range(4)))
        engine = group.engines[0]
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vkv_requests_running{model="tiny-llama"} 0.0' in metrics and "vkv_kv_budget_held_bytes{" in metrics
        ended, asked = [], []

        def listener(output) -> None:  # a call to the engine process from here is refused, not a 60 s hang
            if not asked:
                with pytest.raises(InvalidRequestError, match="would wait forever") as refused:
                    engine.stats()
                asked.append(refused)
            if output.finished:
                ended.append(output)

        engine.add_request([5, 6], SamplingParams(max_tokens=100, ignore_eos=True), request_id="last",
                           on_output=listener)  # fmt: skip
        with pytest.raises(InvalidRequestError, match="request id 'last' is in use"):
            engine.add_request([7], request_id="last", on_output=print)
        deadline = time.monotonic() + 30
        while not asked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert asked and not ended  # the first request is still running: the refused one took nothing from it
    finally:
        uv.should_exit = True
        thread.join(30)
        group.close()
        local.close()
        local.pool.close()
    assert group.process.exitcode == 0
    assert len(ended) == 1 and ended[0].finish_reason in ("abort", "error")
    with pytest.raises(EngineProcessError, match="engine process has exited"):
        engine.add_request([5], request_id="after")
