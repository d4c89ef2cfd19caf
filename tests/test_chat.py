"""Chat backends: ChatEndpoint against a real OpenAI-compatible HTTP server on the loopback interface (request body,
Authorization header, retries, timeouts, the key kept out of reprs and errors), backend specs, and LocalChatModel
generating with the tiny random-init Llama."""

from __future__ import annotations

import base64
import copy
import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dynlab.chat import ChatEndpoint, ChatEndpointError, LocalChatModel, backend_from_spec, redact_spec
from dynlab.errors import InputError, redact

KEY = "sk-test-5ecret-d0-not-leak"
URL_SECRET = "SECRETKEY"  # the password part of a URL's userinfo


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leaked(err: BaseException, *texts: str) -> list[str]:
    """Which of ``texts`` appear in the exception's message, repr or whole formatted traceback (chain included)."""
    shown = str(err) + repr(err) + "".join(traceback.format_exception(err))
    return [t for t in texts if t in shown]


class ChatServer:
    """An OpenAI-compatible ``POST /v1/chat/completions`` server on 127.0.0.1 (a free port), served from a thread.

    Args:
        reply: the assistant's text for a request body (``None`` sends ``"content": null``; bytes are sent raw).
        statuses: HTTP error statuses answered to the first requests, one each, before the server replies.
        delay: seconds to sleep before answering each request (a slow endpoint).

    Every request is recorded in ``requests`` as ``(path, headers with lower-case names, body)``.
    """

    def __init__(self, reply: Callable[[dict], str | bytes | None] | None = None, statuses: tuple[int, ...] = (),
                 delay: float = 0.0):
        self.reply = reply or (lambda body: "Hello from the server.")
        self.statuses, self.delay = list(statuses), delay
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = server.statuses.pop(0) if server.statuses else 200
                time.sleep(server.delay)
                if self.path != "/v1/chat/completions":
                    status = 404
                if status != 200:
                    data = json.dumps({"error": {"message": f"status {status}", "type": "test"}}).encode()
                elif isinstance(content := server.reply(body), bytes):
                    data = content
                else:
                    data = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        return Handler

    def __enter__(self) -> ChatServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def one_thread():
    """The tiny model generates token by token: one intra-op thread is far faster than two fighting for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MESSAGES = [{"role": "system", "content": "You rephrase text."}, {"role": "user", "content": "Rephrase: hi there"}]


def test_request_body_and_bearer_key_from_the_named_env_var(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer() as server:
        endpoint = ChatEndpoint(server.base_url + "/", "my-model", api_key_env="MY_KEY", timeout=5)
        assert endpoint.complete(MESSAGES, temperature=0.25, max_tokens=17) == "Hello from the server."
    [(path, headers, body)] = server.requests
    assert path == "/v1/chat/completions"
    assert body == {"model": "my-model", "messages": MESSAGES, "temperature": 0.25, "max_tokens": 17}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("value", [None, ""])
def test_no_authorization_header_without_a_key(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("MY_KEY", raising=False)
    else:
        monkeypatch.setenv("MY_KEY", value)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # another variable's key is not sent
    with ChatServer() as server:
        ChatEndpoint(server.base_url, "m", api_key_env="MY_KEY").complete(MESSAGES)
    assert "authorization" not in server.requests[0][1]


def test_the_key_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    with ChatServer() as server:
        endpoint = ChatEndpoint(server.base_url, "m", api_key_env="MY_KEY")
        monkeypatch.setenv("MY_KEY", KEY)
        endpoint.complete(MESSAGES)
    assert server.requests[0][1]["authorization"] == f"Bearer {KEY}"


def test_retries_server_errors_and_rate_limits_then_succeeds():
    with ChatServer(reply=lambda body: "finally", statuses=(500, 429, 503)) as server:
        endpoint = ChatEndpoint(server.base_url, "m", retries=3, backoff=0)
        assert endpoint.complete(MESSAGES) == "finally"
    assert len(server.requests) == 4
    assert all(body == server.requests[0][2] for _, _, body in server.requests)  # the same request each time


def test_gives_up_after_the_retries():
    with ChatServer(statuses=(502, 502, 502, 502)) as server:
        with pytest.raises(RuntimeError, match=r"after 3 attempt\(s\): HTTP 502"):
            ChatEndpoint(server.base_url, "m", retries=2, backoff=0).complete(MESSAGES)
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(status):
    with ChatServer(statuses=(status,)) as server:
        with pytest.raises(RuntimeError, match=rf"after 1 attempt\(s\): HTTP {status}"):
            ChatEndpoint(server.base_url, "m", retries=3, backoff=0).complete(MESSAGES)
    assert len(server.requests) == 1


def test_a_wrong_base_url_is_a_404_not_retried():
    with ChatServer() as server:
        with pytest.raises(RuntimeError, match="HTTP 404"):
            ChatEndpoint(f"http://127.0.0.1:{server.port}/v2", "m", retries=3, backoff=0).complete(MESSAGES)
    assert [path for path, _, _ in server.requests] == ["/v2/chat/completions"]


def test_timeouts_are_retried_then_raise(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer(delay=1.0) as server:
        endpoint = ChatEndpoint(server.base_url, "m", api_key_env="MY_KEY", timeout=0.2, retries=1, backoff=0)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"after 2 attempt\(s\): .*timed out") as err:
            endpoint.complete(MESSAGES)
        assert time.monotonic() - start < 1.5  # each attempt stopped at the timeout, not at the server's reply
        assert len(server.requests) == 2
    assert KEY not in str(err.value)


def test_an_unreachable_server_is_retried_then_raises(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer() as server:
        url = server.base_url
    # the server is closed: nothing listens on its port any more
    with pytest.raises(RuntimeError, match=r"after 2 attempt\(s\)") as err:
        ChatEndpoint(url, "m", api_key_env="MY_KEY", retries=1, backoff=0, timeout=2).complete(MESSAGES)
    assert url in str(err.value) and KEY not in str(err.value)


@pytest.mark.parametrize("reply", [None, b"this is not json", b'{"choices": []}', b"[1, 2]"],
                         ids=["null_content", "not_json", "no_choices", "a_list"])
def test_a_malformed_reply_raises_without_retrying(reply):
    with ChatServer(reply=lambda body: reply) as server:
        with pytest.raises(RuntimeError, match=r"after 1 attempt\(s\): unexpected response"):
            ChatEndpoint(server.base_url, "m", retries=3, backoff=0).complete(MESSAGES)
    assert len(server.requests) == 1


def test_the_key_is_in_no_repr_and_no_error(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer(statuses=(500, 500, 401)) as server:
        endpoint = ChatEndpoint(server.base_url, "m", api_key_env="MY_KEY", retries=1, backoff=0)
        assert KEY not in repr(endpoint) and "MY_KEY" in repr(endpoint)
        for _ in range(2):  # a 5xx after its retry, then a client error
            with pytest.raises(RuntimeError) as err:
                endpoint.complete(MESSAGES)
            assert KEY not in str(err.value) and KEY not in repr(err.value)
    assert all(headers["authorization"] == f"Bearer {KEY}" for _, headers, _ in server.requests)


def test_url_credentials_become_basic_auth_and_appear_nowhere(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    with ChatServer() as server:
        url = f"http://user:{URL_SECRET}@127.0.0.1:{server.port}/v1"
        endpoint = ChatEndpoint(url, "m", api_key_env="MY_KEY")
        assert endpoint.url == server.base_url + "/chat/completions"
        assert URL_SECRET not in repr(endpoint) + endpoint.url
        assert endpoint.complete(MESSAGES) == "Hello from the server."  # urllib cannot reach a host with userinfo
        monkeypatch.setenv("MY_KEY", KEY)
        endpoint.complete(MESSAGES)
    basic = base64.b64encode(f"user:{URL_SECRET}".encode()).decode()
    assert [h["authorization"] for _, h, _ in server.requests] == [f"Basic {basic}", f"Bearer {KEY}"]


def test_a_failing_endpoint_with_url_credentials_and_a_key_leaks_neither(monkeypatch, capsys, caplog):
    monkeypatch.setenv("MY_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    spec = f"openai:http://user:{URL_SECRET}@127.0.0.1:{closed_port()}/v1@m#MY_KEY"
    backend = backend_from_spec(spec)
    backend.retries, backend.backoff = 1, 0
    with pytest.raises(ChatEndpointError, match=r"after 2 attempt\(s\)") as err:
        backend.complete(MESSAGES)
    assert "127.0.0.1" in str(err.value) and leaked(err.value, URL_SECRET, KEY) == []
    with pytest.raises(InputError) as bad:  # an error that names the spec redacts it
        backend_from_spec(spec.replace("http://", "ftp://"))
    assert "ftp://***@127.0.0.1" in str(bad.value) and leaked(bad.value, URL_SECRET) == []
    printed = capsys.readouterr()
    assert URL_SECRET not in printed.out + printed.err + caplog.text and KEY not in printed.out + printed.err


@pytest.mark.parametrize(("text", "expected"), [
    ("https://user:SECRETKEY@host/v1 failed", "https://***@host/v1 failed"),
    ("openai:http://TOKEN@10.0.0.1:8000/v1@m#ENV", "openai:http://***@10.0.0.1:8000/v1@m#ENV"),
    ("GET /v1?api_key=SECRETKEY&page=2", "GET /v1?api_key=***&page=2"),
    ("token=SECRETKEY password=SECRETKEY", "token=*** password=***"),
    ("Authorization: Bearer SECRETKEY-0123", "Authorization: Bearer ***"),
    ("{'Authorization': 'Basic dXNlcjpTRUNSRVRLRVk='}", "{'Authorization': 'Basic ***'}"),
    (f"the key {KEY} was refused", "the key sk-*** was refused"),
    ("hf_abcdefghijklmnopqrstuvwxyz0123", "hf_***"),
    # not credentials: left as they are
    ("http://127.0.0.1:8000/v1@m", "http://127.0.0.1:8000/v1@m"),
    ("max_new_tokens=5, a basic task-specific question, api_key_env=MY_KEY", None),
])
def test_redact(text, expected):
    assert redact(text) == (text if expected is None else expected)
    assert redact(redact(text)) == redact(text)


def test_input_errors_are_redacted():
    err = InputError("cannot reach https://u:SECRETKEY@h/x", file="s3://u:SECRETKEY@bucket/f",
                     field="api_key=SECRETKEY")
    assert "SECRETKEY" not in str(err) + (err.file or "") + (err.field or "") + err.message
    assert str(err) == "s3://***@bucket/f: field 'api_key=***': cannot reach https://***@h/x"


def test_backend_from_spec_builds_a_working_endpoint(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer() as server:
        backend = backend_from_spec(f"openai:http://127.0.0.1:{server.port}/v1@my-model#MY_KEY")
        assert isinstance(backend, ChatEndpoint)
        assert (backend.url, backend.model, backend.api_key_env) == (
            f"http://127.0.0.1:{server.port}/v1/chat/completions", "my-model", "MY_KEY")
        assert backend.complete(MESSAGES) == "Hello from the server."
    _, headers, body = server.requests[0]
    assert body["model"] == "my-model" and headers["authorization"] == f"Bearer {KEY}"


def test_backend_from_spec_defaults_and_at_signs_in_the_url():
    backend = backend_from_spec("openai:https://user@example.org/v1@org/model-7b")
    assert (backend.url, backend.model, backend.api_key_env) == (  # the userinfo is taken out of the URL
        "https://example.org/v1/chat/completions", "org/model-7b", "OPENAI_API_KEY")


@pytest.mark.parametrize("spec", ["", "tiny", "openai", "openai:http://127.0.0.1:8000/v1", "hf:", "vllm:http://x@m",
                                  "openai:@my-model", "openai:http://127.0.0.1:8000/v1@", "openai:localhost:8000/v1@m",
                                  "openai:http://127.0.0.1:8000/v1@#MY_KEY"])
def test_a_bad_spec_is_an_input_error(spec):
    with pytest.raises(InputError) as err:
        backend_from_spec(spec)
    message = str(err.value)
    assert "\n" not in message and "openai:BASE_URL@MODEL" in message and redact(spec) in message


@pytest.mark.parametrize(("spec", "reason"), [
    # @MODEL forgotten: the last @ is the userinfo's, and "KEY@host/v1" would be read as port and model
    (f"openai:https://u:{URL_SECRET}@example.org/v1", "port is not a number"),
    (f"openai:https://u:{URL_SECRET}@example.org/v1#MY_KEY", "port is not a number"),
    ("openai:https://u:4321@example.org/v1", "no path and MODEL has a '/'"),  # a key that looks like a port
    ("openai:https://@m", "no host"),
])
def test_a_spec_cut_inside_its_credentials_is_refused_and_never_shown(spec, reason):
    with pytest.raises(InputError) as err:
        backend_from_spec(spec)
    secret = URL_SECRET if URL_SECRET in spec else ":4321"
    assert reason in str(err.value) and "\n" not in str(err.value) and leaked(err.value, secret) == []
    assert secret not in redact_spec(spec) and redact_spec(spec) == redact(spec)  # what a results file would record


def test_an_endpoint_url_that_is_no_url_is_refused_without_quoting_it():
    with pytest.raises(InputError, match="port is not a number") as err:
        ChatEndpoint(f"https://u:{URL_SECRET}", "m")
    assert leaked(err.value, URL_SECRET) == []


@pytest.mark.parametrize(("spec", "shown"), [
    ("openai:http://127.0.0.1:8000@m", None),  # no path: @m is the model, the host and port stay
    ("openai:http://127.0.0.1:8/v1@org/m#MY_KEY", None),
    (f"openai:https://user:{URL_SECRET}@example.org/v1@m#MY_KEY", "openai:https://***@example.org/v1@m#MY_KEY"),
    (f"openai:https://h/v1?api_key={URL_SECRET}@m", "openai:https://h/v1?api_key=***@m"),
    (f"hf:https://u:{URL_SECRET}@h/x", "hf:https://***@h/x"),
])
def test_redact_spec_hides_credentials_and_keeps_the_host(spec, shown):
    assert redact_spec(spec) == (spec if shown is None else shown)


def test_local_chat_model_generates_deterministically(one_thread):
    model = LocalChatModel("tiny", seed=3)
    first = model.complete(MESSAGES, max_tokens=8)
    assert isinstance(first, str) and first
    assert LocalChatModel("tiny", seed=3).complete(MESSAGES, max_tokens=8) == first  # same seed, same sample
    assert LocalChatModel("tiny", seed=4).complete(MESSAGES, max_tokens=8) != first  # another seed, another one
    # greedy decoding does not depend on the seed
    greedy = model.complete(MESSAGES, temperature=0, max_tokens=8)
    assert LocalChatModel("tiny", seed=4).complete(MESSAGES, temperature=0, max_tokens=8) == greedy


def test_local_chat_model_batches_conversations(one_thread):
    model = LocalChatModel("tiny")
    other = [{"role": "user", "content": "A much longer question, so the batch needs left padding: why?"}]
    batch = model.complete_many([MESSAGES, other], temperature=0, max_tokens=6)
    assert len(batch) == 2 and all(isinstance(text, str) for text in batch)
    assert batch == [model.complete(MESSAGES, temperature=0, max_tokens=6),
                     model.complete(other, temperature=0, max_tokens=6)]
    assert model.complete_many([], max_tokens=6) == []


def test_local_chat_model_renders_with_the_chat_template_when_there_is_one():
    model = LocalChatModel("tiny")
    hh_style = model.tokenizer.decode(model.render(MESSAGES))
    assert hh_style == "You rephrase text.\n\nHuman: Rephrase: hi there\n\nAssistant:"
    model.tokenizer = copy.deepcopy(model.tokenizer)  # the tiny tokenizer is shared: do not give it a template
    model.tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = model.render(MESSAGES)
    assert all(isinstance(i, int) for i in ids)
    assert model.tokenizer.decode(ids) == "<system>You rephrase text.<user>Rephrase: hi there<assistant>"


def test_backend_from_spec_hf_is_a_local_chat_model(one_thread):
    backend = backend_from_spec("hf:tiny", seed=5)
    assert isinstance(backend, LocalChatModel) and backend.seed == 5
    assert backend.complete(MESSAGES, max_tokens=4) == LocalChatModel("tiny", seed=5).complete(MESSAGES, max_tokens=4)
