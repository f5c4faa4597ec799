"""`diffmas serve`: the OpenAI API over the tiny model, exercised by real clients against a live uvicorn server.

Every answer is compared with what ``System.run`` gives for the same question alone; batches, a full queue, a client
that leaves and a shutdown are staged by holding the worker thread at a gate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from conftest import make_backbone, make_tokenizer

pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'diffmas[serve]')")
openai = pytest.importorskip("openai", reason="needs the serve extra (pip install 'diffmas[serve]')")

from diffmas.adapters import LoraSettings, attach_lora, save_adapters  # noqa: E402
from diffmas.decode import DecodeConfig, cut_at_stop  # noqa: E402
from diffmas.serve.app import ServeConfig, create_app  # noqa: E402
from diffmas.serve.engine import TextStream  # noqa: E402
from diffmas.serve.protocol import Limits  # noqa: E402
from diffmas.serve.server import make_server  # noqa: E402
from diffmas.systems import build_system  # noqa: E402

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Why is the sky blue?", "3 x 3 =", "Spell cat.", "A long question "
             "about nothing in particular, to make the rows of a batch differ in length.", "hi", "Count to five."]
LIMITS = Limits(max_request_bytes=4000, max_messages=3, max_prompts=4, max_tokens=16, default_max_tokens=8,
                max_question_tokens=200, max_latent_steps=4)


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """single, latent_mas and text_mas on one tiny backbone; diffmas (trained for duo, m = 2) on its own."""
    shared = make_backbone()
    trained = make_backbone()
    roles = attach_lora(trained, LoraSettings(rank=2), ["reasoner", "solver"])
    adapter = tmp_path_factory.mktemp("adapter")
    save_adapters(trained, adapter, roles, LoraSettings(rank=2),
                  extra={"system": "diffmas", "topology": "duo", "latent_steps": 2})
    return {"single": build_system("single", shared),
            "latent_mas": build_system("latent_mas", shared, topology="duo", latent_steps=2),
            "text_mas": build_system("text_mas", shared, topology="duo", writer_max_new_tokens=3),
            "diffmas": build_system("diffmas", make_backbone(), adapter=str(adapter))}


@contextmanager
def serving(systems: dict, **config):
    """A live server on a free port, stopped (and checked stopped) on exit; yields (base url, app, server)."""
    app = create_app(systems, ServeConfig(**{"limits": LIMITS, **config}))
    server = make_server(app, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app, server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served(systems):
    with serving(systems, max_batch=4, batch_window_ms=5) as (url, app, _):
        yield url, app


@contextmanager
def gated(systems: dict, **config):
    """:func:`serving` with a :class:`Gate` on its worker; yields (base url, gate, server)."""
    with serving(systems, **config) as (url, app, server), Gate(app) as gate:
        yield url, gate, server


def alone(system, question: str, max_tokens: int = 8, stop: tuple[str, ...] = ()) -> dict:
    """What `diffmas run` gives for this question by itself."""
    return system.run([question], DecodeConfig(max_new_tokens=max_tokens, stop=stop), batch_size=1)[0]


def call(url: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
    """(status, headers, JSON body) of a raw HTTP request; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def events(url: str, path: str, body: dict, timeout: float = 60) -> list:
    """The server-sent events of a streamed request: JSON objects, then "[DONE]"."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().rstrip("\n") for line in response if line.startswith(b"data: ")]
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines]


def streamed(chunks: list, index: int = 0) -> tuple[list[str], str]:
    """(the text pieces, the finish reason) of answer ``index`` in a stream's chunks (chat or completions)."""
    choices = [c["choices"][0] for c in chunks if isinstance(c, dict) and c.get("choices")
               and c["choices"][0]["index"] == index]
    pieces = [c["delta"].get("content") if "delta" in c else c["text"] for c in choices]
    assert [c["finish_reason"] for c in choices].count(None) == len(choices) - 1 and choices[-1]["finish_reason"]
    return [p for p in pieces if p], choices[-1]["finish_reason"]


def chat(question: str, **fields) -> dict:
    return {"model": "latent_mas", "messages": [{"role": "user", "content": question}], **fields}


def assert_openai_error(status: int, body: dict, want: int, fragment: str) -> None:
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert fragment in body["error"]["message"], body


class Gate:
    """Holds the worker thread at the start of every batch until opened; records each batch's questions and key.
    Used as a context manager, it opens on the way out, so that a failing test still lets the server stop."""

    def __init__(self, app) -> None:
        self.batcher, self.run = app.state.batcher, app.state.batcher.run
        self.open, self.batches, self.keys = threading.Event(), [], []
        self.batcher.run = self

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc) -> None:
        self.open.set()

    def __call__(self, key, items):
        self.batches.append([item.question for item in items])
        self.keys.append(key)
        assert self.open.wait(60), "the gate was never opened"
        return self.run(key, items)

    def until(self, waiting: int | None = None, running: int = 1, total: int | None = None) -> None:
        """Wait until this many requests wait and run (or, with ``total``, wait and run together, one batch
        running)."""
        def now():
            waits, runs = self.batcher.waiting, self.batcher.running
            return (waits + runs == total and runs > 0) if total is not None else (waits, runs) == (waiting, running)

        deadline = time.monotonic() + 30
        while not now():
            assert time.monotonic() < deadline, (self.batcher.waiting, self.batcher.running)
            time.sleep(0.01)


def test_openai_client_chat_completions_models_and_streaming(served, systems):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["single", "latent_mas", "text_mas", "diffmas"]
    assert client.models.retrieve("diffmas").model_extra["diffmas"]["trained"] is True

    want = alone(systems["latent_mas"], QUESTIONS[0])
    reply = client.chat.completions.create(model="latent_mas", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           max_tokens=8)
    assert reply.choices[0].message.content == want["answer"]
    assert reply.choices[0].finish_reason == ("length" if want["generated_tokens"] == 8 else "stop")
    usage = reply.usage
    assert usage.prompt_tokens == sum(a["prompt_tokens"] for a in want["agents"])
    assert usage.completion_tokens == want["generated_tokens"] and usage.completion_tokens_details.reasoning_tokens == 0
    assert usage.model_extra["diffmas"]["latent_steps"] == 2  # duo: one writer, m = 2
    assert usage.model_extra["diffmas"]["trace_positions"] == want["trace_tokens"]

    stream = client.chat.completions.create(model="latent_mas", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["answer"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # pieces, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == usage.total_tokens

    text = alone(systems["text_mas"], QUESTIONS[1], max_tokens=5)
    reply = client.chat.completions.create(model="text_mas", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=5)
    assert reply.choices[0].message.content == text["answer"]
    assert reply.usage.completion_tokens_details.reasoning_tokens == text["agents"][0]["generated_tokens"] > 0

    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="system messages are not supported"):
        client.chat.completions.create(model="single", messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "hi"}])


def test_completions_and_per_request_settings(served, systems):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="single", prompt=QUESTIONS[2:4], max_tokens=6)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == \
        [alone(systems["single"], q, 6)["answer"] for q in QUESTIONS[2:4]]
    streamed = client.completions.create(model="single", prompt=QUESTIONS[2], max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text

    # A training-free system runs with the topology and latent steps a request names ...
    other = build_system("latent_mas", systems["latent_mas"].backbone, topology="sequential", latent_steps=3)
    reply = client.chat.completions.create(model="latent_mas", messages=[{"role": "user", "content": QUESTIONS[4]}],
                                           max_tokens=6, extra_body={"topology": "sequential", "latent_steps": 3})
    assert reply.choices[0].message.content == alone(other, QUESTIONS[4], 6)["answer"]
    assert reply.usage.model_extra["diffmas"]["latent_steps"] == 9  # three writers, m = 3
    # ... a trained one only with those it was trained with.
    reply = client.chat.completions.create(model="diffmas", messages=[{"role": "user", "content": QUESTIONS[4]}],
                                           max_tokens=6, extra_body={"topology": "duo", "latent_steps": 2})
    assert reply.choices[0].message.content == alone(systems["diffmas"], QUESTIONS[4], 6)["answer"]
    with pytest.raises(openai.BadRequestError, match="trained with topology 'duo' and latent_steps 2"):
        client.chat.completions.create(model="diffmas", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"latent_steps": 3})

    # Sampling with a seed reproduces `diffmas run --seed` for that question.
    sampled = systems["single"].run([QUESTIONS[5]], DecodeConfig(max_new_tokens=8, temperature=0.9, top_p=0.8,
                                                                 seed=7))[0]["answer"]
    reply = client.chat.completions.create(model="single", messages=[{"role": "user", "content": QUESTIONS[5]}],
                                           max_tokens=8, temperature=0.9, top_p=0.8, seed=7)
    assert reply.choices[0].message.content == sampled != alone(systems["single"], QUESTIONS[5])["answer"]


def test_text_stream_sends_only_text_that_no_later_token_changes():
    """Token by token (one per byte): an incomplete character and a possible start of a stop string wait, the
    stop string is never sent, and the pieces join to the final answer."""
    tokenizer = make_tokenizer()
    text, stop = "Hé, wo w wonder", ("won",)
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert len(tokens) == len(text) + 1  # "é" takes two
    final = cut_at_stop(tokenizer.decode(tokens), stop)[0]
    assert final == "Hé, wo w "
    pieces: list[str] = []
    stream = TextStream(pieces.append)
    sent = []
    for n in range(1, len(tokens) + 1):
        stream.step(tokenizer, tokens[:n], stop)
        sent.append(stream.sent)
    assert stream.finish(final) and "".join(pieces) == final
    assert all(final.startswith(s) for s in sent) and not any("\ufffd" in p for p in pieces)
    assert sent[len("Hé, wo w wo".encode()) - 1] == "Hé, wo w "  # "wo" may begin "won"
    assert sent[1] == sent[2] == "H" and sent[3] == "Hé"  # "é" whole (a step late: two decodes must agree)


def test_streamed_answers_join_to_the_answers_alone(systems):
    """Streamed and plain requests in the same batches, with a budget below the batch's and a stop string that
    spans tokens: each stream's pieces join to the answer the request gets alone, in OpenAI's chunk format."""
    model = systems["latent_mas"]
    plain = alone(model, QUESTIONS[5], 8)["answer"]
    at = next(i for i in range(2, len(plain) - 2) if "\ufffd" not in plain[i:i + 2])
    stop = [plain[at:at + 2]]  # two characters: at least two tokens
    assert alone(model, QUESTIONS[5], 8, tuple(stop))["answer"] == plain[:plain.index(stop[0])]
    requests = [
        ("/v1/chat/completions", chat(QUESTIONS[0], max_tokens=3, stream=True)),  # the batch decodes 8
        ("/v1/chat/completions", chat(QUESTIONS[1], max_tokens=8)),
        ("/v1/completions", {"model": "latent_mas", "prompt": QUESTIONS[2:4], "max_tokens": 8, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", chat(QUESTIONS[5], max_tokens=8, stop=stop, stream=True)),
        ("/v1/completions", {"model": "latent_mas", "prompt": [QUESTIONS[5], QUESTIONS[6]], "max_tokens": 6,
                             "stop": stop, "stream": True}),
    ]
    with gated(systems, max_batch=4, batch_window_ms=1000) as (url, gate, _):
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(events if body.get("stream") else call, url, path, body) for path, body in requests]
            gate.until(total=7)
            gate.open.set()
            short, _, pair, stopped, stopped_pair = [f.result() for f in futures]
    assert sorted(map(len, gate.batches)) == [3, 4]  # one batch per stop setting

    def check(chunks: list, index: int, question: str, max_tokens: int, stop: tuple[str, ...] = ()) -> None:
        pieces, finish = streamed(chunks, index)
        assert "".join(pieces) == alone(model, question, max_tokens, stop)["answer"]
        unstopped = alone(model, question, max_tokens)
        ended = cut_at_stop(unstopped["answer"], stop)[1] or unstopped["generated_tokens"] < max_tokens
        assert finish == ("stop" if ended else "length")
        assert len(pieces) > 1 or stop  # pieces, not one blob (a stopped answer may be one character)

    assert short[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and short[-1] == "[DONE]"
    check(short, 0, QUESTIONS[0], 3)
    check(pair, 0, QUESTIONS[2], 8)
    check(pair, 1, QUESTIONS[3], 8)
    assert pair[-2]["choices"] == [] and pair[-2]["usage"]["completion_tokens"] == sum(
        alone(model, q, 8)["generated_tokens"] for q in QUESTIONS[2:4])
    check(stopped, 0, QUESTIONS[5], 8, tuple(stop))
    check(stopped_pair, 0, QUESTIONS[5], 6, tuple(stop))
    check(stopped_pair, 1, QUESTIONS[6], 6, tuple(stop))
    assert stopped_pair[-1] == "[DONE]" and "usage" not in stopped_pair[-2]


@pytest.fixture
def paced():
    """A single agent on a backbone of its own whose decoding, once ``pace.at`` is set, holds at that call of
    the LM head (one per token) until ``pace.go`` is set (10 s at most; ``pace.waited`` says whether it came),
    or fails there with ``pace.fail``."""
    system = build_system("single", make_backbone())
    pace = SimpleNamespace(go=threading.Event(), at=0, calls=0, waited=[], fail=False)
    logits = system.backbone.logits

    def paced_logits(hidden):
        if pace.at:
            pace.calls += 1
            if pace.calls == pace.at:
                if pace.fail:
                    raise RuntimeError("the accelerator caught fire")
                pace.waited.append(pace.go.wait(10))
        return logits(hidden)

    system.backbone.logits = paced_logits
    return system, pace


def test_streaming_sends_the_answer_while_the_final_agent_decodes(paced):
    """The decoding holds after a few tokens until the client has a piece of the answer: a server that sends
    only once the rollout has finished leaves the hold to time out."""
    system, pace = paced
    want = alone(system, QUESTIONS[0], 12)["answer"]
    pace.at = 6
    with serving({"single": system}) as (url, _, _):
        request = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({**chat(QUESTIONS[0], max_tokens=12, stream=True),
                                                          "model": "single"}).encode())
        chunks = []
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[6:]))
                    if chunks[-1]["choices"] and chunks[-1]["choices"][0]["delta"].get("content"):
                        pace.go.set()
    assert pace.waited == [True], "no piece of the answer reached the client while the final agent decoded"
    assert "".join(streamed(chunks)[0]) == want


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_that_leaves_mid_stream_cancels_its_job(paced):
    system, pace = paced
    want = alone(system, "after", 8)["answer"]
    pace.at = 6
    with serving({"single": system}, max_batch=1) as (url, app, _):
        errors = ErrorLog()
        for name in ("uvicorn.error", "diffmas"):
            logging.getLogger(name).addHandler(errors)
        batcher, cancel, cancelled = app.state.batcher, app.state.batcher.cancel, []
        batcher.cancel = lambda job: (cancel(job), cancelled.append(job.future.cancelled()))
        try:
            request = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                             data=json.dumps({**chat("gone", max_tokens=12, stream=True),
                                                              "model": "single"}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.readline().startswith(b"data: ")  # the opening chunk; then the client goes
            deadline = time.monotonic() + 10
            while True not in cancelled:  # the job was cancelled while its batch still decoded
                assert time.monotonic() < deadline, cancelled
                time.sleep(0.01)
            pace.go.set()
            status, _, body = call(url, "/v1/chat/completions", {**chat("after"), "model": "single"})
            assert status == 200 and body["choices"][0]["message"]["content"] == want
        finally:
            for name in ("uvicorn.error", "diffmas"):
                logging.getLogger(name).removeHandler(errors)
    assert pace.waited == [True] and not errors.records


def test_a_rollout_that_fails_mid_stream_ends_it_with_an_error_event(paced):
    system, pace = paced
    pace.at, pace.fail = 6, True
    with serving({"single": system}) as (url, _, _):
        chunks = events(url, "/v1/chat/completions", {**chat(QUESTIONS[0], max_tokens=12, stream=True),
                                                      "model": "single"})
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["type"] == "server_error"
    assert "caught fire" in chunks[-2]["error"]["message"]
    assert any(c["choices"][0]["delta"].get("content") for c in chunks[:-2])  # it had begun


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    (chat("hi", n=2), 400, "'n' must be 1"),
    ({"model": "latent_mas", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}]}, 400, "exactly one user message"),
    ({"model": "latent_mas", "messages": [{"role": "user", "content": "a"}] * 4}, 400, "limit is 3 (--max-messages)"),
    (chat("hi", max_tokens=17), 400, "limit is 16 (--max-tokens-limit)"),
    (chat("hi", latent_steps=5), 400, "limit is 4 (--max-latent-steps)"),
    (chat("x" * 201), 400, "limit is 200 (--max-question-tokens)"),
    (chat("x" * 5000), 413, "limit is 4000 (--max-request-bytes)"),
    (chat("hi", temperature=-1), 400, "'temperature' must be a number"),
    (chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    (chat("hi", logprobs=True), 400, "'logprobs' is not supported"),
    (chat("hi", latent_step=3), 400, "unrecognized request argument 'latent_step'"),
    (chat("hi", topology="/etc/passwd"), 400, "unknown topology '/etc/passwd'"),
    ({**chat("hi", latent_steps=1), "model": "single"}, 400, "is a single agent"),
    ({**chat("hi", latent_steps=1), "model": "text_mas"}, 400, "latent_steps does not apply"),
])
def test_malformed_and_oversize_requests_get_openai_errors(served, body, status, fragment):
    url, _ = served
    assert_openai_error(*call(url, "/v1/chat/completions", body)[::2], status, fragment)


def test_completions_limits_and_unknown_routes(served):
    url, _ = served
    prompt = {"model": "single", "prompt": ["a"] * 5}
    assert_openai_error(*call(url, "/v1/completions", prompt)[::2], 400, "limit is 4 (--max-prompts)")
    assert_openai_error(*call(url, "/v1/completions", {"model": "single", "prompt": [[1, 2]]})[::2], 400, "token-id")
    assert_openai_error(*call(url, "/v1/nothing")[::2], 404, "Not Found")


def test_concurrent_clients_get_the_answers_system_run_gives_one_by_one(systems):
    """Twelve clients at once, for two systems, some with a stop string and with different max_tokens: every one
    gets what its request gets alone, nothing is lost, and the requests really shared rollouts."""
    requests = [(model, q, max_tokens, stop) for model in ("latent_mas", "diffmas") for q, max_tokens, stop in
                zip(QUESTIONS[:6], (8, 4, 8, 3, 8, 6), ((), (), ("a",), ("a",), (), ()))]
    with gated(systems, max_batch=4, batch_window_ms=1000) as (url, gate, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(request):
            model, question, max_tokens, stop = request
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, stop=list(stop) or None)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = pool.map(ask, requests)
            gate.until(total=len(requests))
            gate.open.set()
            answers = list(answers)
    assert answers == [alone(systems[m], q, k, s)["answer"] for m, q, k, s in requests]
    assert sorted(q for batch in gate.batches for q in batch) == sorted(q for _, q, _, _ in requests)
    assert len(gate.batches) < len(requests) and max(map(len, gate.batches)) == 4


def test_api_key_guards_everything_but_health(systems):
    with serving({"single": systems["single"]}, api_key="s3cret") as (url, _, _):
        assert call(url, "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _, body = call(url, "/v1/models", headers=headers)
            assert_openai_error(status, body, 401, "API key")
            assert body["error"]["code"] == "invalid_api_key"
        assert call(url, "/v1/chat/completions", {**chat("hi"), "model": "single"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == ["single"]
        reply = client.chat.completions.create(model="single", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == alone(systems["single"], "hi")["answer"]
    with serving({"single": systems["single"]}) as (url, _, _):  # no key: no header needed
        assert call(url, "/v1/models")[0] == 200


def test_full_queue_answers_503_with_retry_after_and_the_loop_stays_responsive(systems):
    with gated({"single": systems["single"]}, max_batch=1, max_queue=2, batch_window_ms=0) as (url, gate, _):
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(call, url, "/v1/chat/completions", {**chat("q0"), "model": "single"})
            gate.until(waiting=0)
            queued = [pool.submit(call, url, "/v1/chat/completions", {**chat(f"q{i}"), "model": "single"})
                      for i in (1, 2)]
            gate.until(waiting=2)
            started = time.monotonic()  # a rollout is running: the event loop still answers at once
            status, _, health = call(url, "/health")
            assert status == 200 and health["waiting"] == 2 and time.monotonic() - started < 2
            status, headers, body = call(url, "/v1/chat/completions", {**chat("q3"), "model": "single"})
            assert_openai_error(status, body, 503, "--max-queue")
            assert int(headers["Retry-After"]) >= 1
            gate.open.set()
            assert [f.result()[0] for f in (first, *queued)] == [200, 200, 200]


def test_a_disconnected_client_leaves_the_queue(systems):
    with gated({"single": systems["single"]}, max_batch=1, batch_window_ms=0) as (url, gate, _):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, url, "/v1/chat/completions", {**chat("q0"), "model": "single"})
            gate.until(waiting=0)
            for stream in (False, True):  # gives up while its request waits
                with pytest.raises((TimeoutError, urllib.error.URLError)):
                    call(url, "/v1/chat/completions", {**chat("gone"), "model": "single", "stream": stream},
                         timeout=0.5)
                gate.until(waiting=0)  # its slot is free again
            gate.open.set()
            assert first.result()[0] == 200
            status, _, body = call(url, "/v1/chat/completions", {**chat("after"), "model": "single"})
        assert status == 200 and body["choices"][0]["message"]["content"] == alone(systems["single"], "after")["answer"]
    assert [q for batch in gate.batches for q in batch] == ["q0", "after"]  # "gone" never ran


def test_shutdown_with_requests_in_flight_answers_every_client(systems):
    """Stopping the server: the running batch finishes and its client gets the answer; the waiting requests get a
    503 with Retry-After at once; nobody is left hanging or cut off, and the server stops."""
    with gated({"single": systems["single"]}, max_batch=1, batch_window_ms=0) as (url, gate, server):
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(call, url, "/v1/chat/completions", {**chat("q0"), "model": "single"})
            gate.until(waiting=0)
            waiting = [pool.submit(call, url, "/v1/chat/completions", {**chat(f"q{i}"), "model": "single",
                                                                       "stream": i == 3})
                       for i in (1, 2, 3)]  # a streamed request's response begins only when its batch starts
            gate.until(waiting=3)
            server.should_exit = True
            for future in waiting:
                status, headers, body = future.result(timeout=30)
                assert_openai_error(status, body, 503, "shutting down")
                assert "Retry-After" in headers
            assert not running.done()
            gate.open.set()
            status, _, body = running.result(timeout=30)
    assert status == 200 and body["choices"][0]["message"]["content"] == alone(systems["single"], "q0")["answer"]
    assert gate.batches == [["q0"]]


def test_lm_eval_local_chat_completions_against_the_server(systems, monkeypatch):
    """lm-eval's own OpenAI-API model, two requests at a time, on the offline GSM8K task."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason="needs the lmeval extra")
    from diffmas.lmeval_tasks import task_manager

    limits = dataclasses.replace(LIMITS, max_question_tokens=1000)  # a GSM8K question in the byte-level tokenizer
    with gated({"latent_mas": systems["latent_mas"]}, max_batch=4, batch_window_ms=50, limits=limits) as (url, spy, _):
        spy.open.set()  # records the batches only
        results = lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=["diffmas_gsm8k"], num_fewshot=0, limit=3,
            model_args=f"model=latent_mas,base_url={url}/v1/chat/completions,num_concurrent=2,max_retries=1,"
                       "tokenized_requests=False", gen_kwargs="max_gen_toks=6", apply_chat_template=True,
            task_manager=task_manager(include_defaults=False), log_samples=True, bootstrap_iters=0)
    samples = sorted((s for s in results["samples"]["diffmas_gsm8k"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert len(samples) == 3 and "exact_match,strict-match" in results["results"]["diffmas_gsm8k"]
    questions = [json.loads(s["arguments"][0][0][0])[0]["content"] for s in samples]  # the chat messages it sent
    assert sorted(questions) == sorted(q for batch in spy.batches for q in batch)
    stop = spy.keys[0].stop  # lm-eval sends its task's `until` strings as `stop`
    assert stop[0] == "Question:" and {k.stop for k in spy.keys} == {stop}
    assert [s["resps"][0][0] for s in samples] == [alone(systems["latent_mas"], q, 6, stop)["answer"]
                                                   for q in questions]


def test_serve_command_line_errors_are_one_line():
    from typer.testing import CliRunner

    from diffmas.cli import app

    for args, fragment in ((["--systems", "telepathy"], "unknown system 'telepathy'"),
                           (["--max-batch", "0"], "--max-batch >= 1"),
                           (["--max-tokens-limit", "0"], "max_tokens must be an integer >= 1"),
                           (["--systems", "diffmas"], "needs an adapter")):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2 and result.stderr.startswith("error:") and fragment in result.stderr, \
            result.output
