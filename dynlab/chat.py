"""Chat backends used to rephrase probe responses (and to judge generations): any OpenAI-compatible chat-completions
endpoint, or a local HF chat model. Both take a list of messages and return the reply text; prompts for a tokenizer
without a chat template are rendered HH style by :func:`default_render_chat`."""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Protocol

from dynlab.errors import InputError, redact

Message = dict[str, str]
HH_ASSISTANT = "\n\nAssistant:"  # the open assistant turn that ends an HH prompt


def default_render_chat(messages: list[dict]) -> str:
    """Render chat messages in HH style, ending with an open ``"\\n\\nAssistant:"`` turn.

    Used when the tokenizer has no chat template. A system message is prepended as is.

    >>> default_render_chat([{"role": "user", "content": "Hi"}])
    '\\n\\nHuman: Hi\\n\\nAssistant:'
    """
    speaker = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    parts = [m["content"] if m["role"] == "system" else speaker[m["role"]] + m["content"] for m in messages]
    return "".join(parts) + HH_ASSISTANT


class ChatEndpointError(RuntimeError):
    """An endpoint that kept failing; the message names the URL and the last error, never a credential."""


class ChatBackend(Protocol):
    def complete(self, messages: Sequence[Message], *, temperature: float = 0.7, max_tokens: int = 256) -> str: ...


class ChatEndpoint:
    """An OpenAI-compatible ``POST {base_url}/chat/completions`` client (stdlib only).

    The API key is read from the environment variable ``api_key_env`` at call time and is sent only in the
    Authorization header: it is never logged, printed or written to a file. Credentials in the URL
    (``https://user:KEY@host/v1``) are taken out of it and sent as HTTP Basic auth when the variable is unset; the
    URL kept, shown and named in errors has none, and every error message is :func:`dynlab.errors.redact`-ed.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint expects.
        api_key_env: environment variable holding the key (may be unset for local servers).
        timeout: seconds per request.
        retries: attempts after the first on timeouts, connection errors, 429 and 5xx (exponential back-off).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0):
        if problem := url_problem(base_url):  # the URL is not shown: a bad "port" may be a key
            raise InputError(problem, field="base_url")
        parts = urllib.parse.urlsplit(base_url.rstrip("/") + "/chat/completions")
        self._basic_auth = None  # base64 "user:password" from the URL, for Basic auth; never shown
        if "@" in parts.netloc:
            userinfo, _, host = parts.netloc.rpartition("@")
            self._basic_auth = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
            parts = parts._replace(netloc=host)
        self.url = urllib.parse.urlunsplit(parts)
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def __repr__(self) -> str:  # no key in reprs
        return redact(f"ChatEndpoint(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})")

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.7, max_tokens: int = 256) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic_auth:
            headers["Authorization"] = f"Basic {self._basic_auth}"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                content = payload["choices"][0]["message"]["content"]
                if not isinstance(content, str):  # e.g. null from a refusal or a tool call
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:
                    break  # a client error will not get better by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                last_error = type(err).__name__ + ": " + str(getattr(err, "reason", err))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                last_error = f"unexpected response ({type(err).__name__}: {err})"
                break
        # raised outside the except blocks, so no chained exception carries the original text
        raise ChatEndpointError(redact(f"chat endpoint {self.url} failed after {attempt + 1} attempt(s): {last_error}"))


class LocalChatModel:
    """A local HF causal LM prompted through its chat template (greedy or sampled).

    Args:
        name_or_path: anything ``dynlab.models.load.ModelSpec`` accepts (a directory, ``embedded:...``, ``tiny``).
        seed: sampling seed.
    """

    def __init__(self, name_or_path: str, seed: int = 0):
        from dynlab.models.load import ModelSpec, load_model, load_tokenizer

        spec = ModelSpec(name_or_path=name_or_path)
        self.tokenizer, self.model, self.seed = load_tokenizer(spec), load_model(spec).eval(), seed

    def render(self, messages: Sequence[Message]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
        return self.tokenizer(default_render_chat(list(messages)))["input_ids"]

    def complete_many(self, conversations: Sequence[Sequence[Message]], *, temperature: float = 0.7,
                      max_tokens: int = 256) -> list[str]:
        from dynlab.models.generate import generate_responses

        return generate_responses(self.model, self.tokenizer, [self.render(c) for c in conversations],
                                  max_new_tokens=max_tokens, do_sample=temperature > 0,
                                  temperature=max(temperature, 1e-5), seed=self.seed)

    def complete(self, messages: Sequence[Message], *, temperature: float = 0.7, max_tokens: int = 256) -> str:
        return self.complete_many([messages], temperature=temperature, max_tokens=max_tokens)[0]


def backend_from_spec(spec: str, seed: int = 0) -> ChatBackend:
    """``hf:PATH_OR_ID`` (also ``hf:embedded:smollm2-135m-instruct``) or ``openai:BASE_URL@MODEL[#KEY_ENV]``."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return LocalChatModel(rest, seed=seed)
    url, model, key_env = parse_endpoint_spec(spec)
    return ChatEndpoint(url, model, api_key_env=key_env)


SPEC_HELP = ("expected hf:PATH_OR_ID or openai:BASE_URL@MODEL[#API_KEY_ENV] with an http(s) BASE_URL, "
             "e.g. openai:http://127.0.0.1:8000/v1@my-model")


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) base URL, without quoting it; None when it is one. A port that is not a number is
    most often the ``KEY`` of ``https://user:KEY@host/v1`` cut at its ``@`` (a spec that lost its ``@MODEL``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "BASE_URL needs http:// or https://"
    try:
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        return "BASE_URL's port is not a number (is the spec missing its @MODEL?)"
    return None if parts.hostname else "BASE_URL has no host"


def parse_endpoint_spec(spec: str) -> tuple[str, str, str]:
    """``openai:BASE_URL@MODEL[#API_KEY_ENV]`` as ``(BASE_URL, MODEL, API_KEY_ENV)`` (``OPENAI_API_KEY`` by default).

    The spec is cut at its last ``@``, so one that lost its ``@MODEL`` (``openai:https://user:KEY@host/v1``) is cut
    inside the URL's credentials. Such a cut is refused, never read as an endpoint (whose URL would hold the key and
    escape :func:`redact`): a BASE_URL with no host or a port that is not a number, or one with no path when MODEL
    has a ``/`` (``openai:https://user:123@host/v1``; write ``http://HOST:PORT/v1@ORG/MODEL``). InputError otherwise.
    """
    kind, _, rest = spec.partition(":")
    url, _, model = rest.rpartition("@")
    model, _, key_env = model.partition("#")
    problem = "" if kind != "openai" or not (url and model) else url_problem(url)
    if problem is None and "/" in model and not urllib.parse.urlsplit(url).path:
        problem = "BASE_URL has no path and MODEL has a '/' (is MODEL the rest of the URL?): give BASE_URL its path"
    if problem is not None:
        raise InputError(f"{problem}; {SPEC_HELP}" if problem else SPEC_HELP, field=spec)
    return url, model, key_env or "OPENAI_API_KEY"


def redact_spec(spec: str) -> str:
    """A backend spec safe to show or record: in ``openai:BASE_URL@MODEL[#API_KEY_ENV]`` the URL's credentials
    (``user:password@``, ``?api_key=``) become ``***`` and its host stays; any other spec, or one that does not parse
    (:func:`parse_endpoint_spec`), goes through :func:`redact` whole (an API key belongs in the variable named after
    ``#``, never in a spec).

    >>> redact_spec("openai:https://user:KEY@example.org/v1@m#MY_KEY"), redact_spec("openai:http://127.0.0.1:8000@m")
    ('openai:https://***@example.org/v1@m#MY_KEY', 'openai:http://127.0.0.1:8000@m')
    """
    try:
        parse_endpoint_spec(spec)
    except InputError:
        return redact(spec)
    url, _, model = spec.removeprefix("openai:").rpartition("@")
    return f"openai:{redact(url)}@{redact(model)}"
