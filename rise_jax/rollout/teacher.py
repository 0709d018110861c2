"""A teacher behind an OpenAI-compatible chat-completions endpoint (GPT-3.5 in the paper, or a vLLM server).

`ChatCompletionsClient` posts `/chat/completions` requests with retries (exponential backoff on connection errors,
timeouts, 429 and 5xx; other 4xx fail at once with the server's message) and caches every response on disk, keyed
by the prompt hash, the model, the sampling parameters and the draw (resample round), so a resumed or repeated run
never pays for the same response twice. `OpenAIChatPolicy` adapts it to the runner's `Policy` protocol; the
teacher's id, temperature and max tokens end up in each turn's log entry.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from rise_jax.rollout.policies import Completion, InstantStream, Sample, TurnRequest, TurnSampling
from rise_jax.files import atomic_write_text

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class TeacherError(RuntimeError):
  """The endpoint refused a request, or kept failing after every retry."""


@dataclasses.dataclass(frozen=True)
class ChatResponse:
  texts: tuple[str, ...]
  finish_reasons: tuple[str, ...]
  prompt_tokens: int | None
  completion_tokens: int | None
  cached: bool = False


class ChatCompletionsClient:
  """Minimal, dependency-free client for `POST {base_url}/chat/completions`.

  base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
  api_key: sent as a bearer token; defaults to $OPENAI_API_KEY (may be absent for local servers).
  cache_dir: where responses are stored (one JSON file per key); None disables the cache.
  """

  def __init__(self, base_url: str, model: str, *, api_key: str | None = None, cache_dir=None,
               max_retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0, timeout_s: float = 120.0,
               sleep: Callable[[float], None] = time.sleep):
    self.base_url = base_url.rstrip("/")
    self.model = model
    self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else None
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self.timeout_s = timeout_s
    self._sleep = sleep
    self.num_requests = 0      # HTTP requests sent, retries included
    self.num_cache_hits = 0
    self._count_lock = threading.Lock()  # the policy calls complete() from several threads

  def cache_key(self, messages: Sequence[dict[str, str]], params: dict[str, Any], draw: str) -> str:
    prompt_hash = hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()
    blob = json.dumps({"prompt": prompt_hash, "model": self.model, "params": params, "draw": draw}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()

  def complete(self, messages: Sequence[dict[str, str]], *, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_tokens: int = 1000, top_k: int = 0, draw: str = "0") -> ChatResponse:
    """`n` responses to `messages`; `draw` separates repeated requests for the same prompt (resampling)."""
    params: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if top_k:  # not an OpenAI parameter; vLLM and others accept it, OpenAI rejects it (loudly)
      params["top_k"] = top_k
    key = self.cache_key(messages, params, draw)
    cached = self._cache_get(key)
    if cached is not None:
      with self._count_lock:
        self.num_cache_hits += 1
      return self._parse(cached, n, cached=True)
    body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            **params}
    payload = self._post_with_retries(body)
    response = self._parse(payload, n, cached=False)  # validate before caching a bad answer
    self._cache_put(key, payload)
    return response

  def _post_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    url = f"{self.base_url}/chat/completions"
    last_error = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        log.warning("teacher %s: %s; retry %d/%d in %.1fs", url, last_error, attempt, self.max_retries, delay)
        self._sleep(delay)
      with self._count_lock:
        self.num_requests += 1
      try:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
          return json.loads(reply.read().decode())
      except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        if e.code not in RETRYABLE_STATUS:
          raise TeacherError(f"{url} answered HTTP {e.code}: {detail}") from e
        last_error = f"HTTP {e.code}: {detail}"
      except (urllib.error.URLError, socket.timeout, ConnectionError, json.JSONDecodeError) as e:
        last_error = f"{type(e).__name__}: {e}"
    raise TeacherError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last_error}")

  def _parse(self, payload: dict[str, Any], n: int, cached: bool) -> ChatResponse:
    try:
      choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
      texts = tuple(c["message"]["content"] or "" for c in choices)
      reasons = tuple(c.get("finish_reason") or "stop" for c in choices)
    except (KeyError, TypeError) as e:
      raise TeacherError(f"{self.base_url}: malformed chat-completions response (missing {e}): "
                         f"{json.dumps(payload)[:300]}") from e
    if len(texts) != n:
      raise TeacherError(f"{self.base_url}: asked for n={n} choices, got {len(texts)}")
    usage = payload.get("usage") or {}
    return ChatResponse(texts=texts, finish_reasons=reasons, prompt_tokens=usage.get("prompt_tokens"),
                        completion_tokens=usage.get("completion_tokens"), cached=cached)

  def _cache_path(self, key: str) -> pathlib.Path:
    return self.cache_dir / key[:2] / f"{key}.json"

  def _cache_get(self, key: str) -> dict[str, Any] | None:
    if self.cache_dir is None:
      return None
    path = self._cache_path(key)
    if not path.is_file():
      return None
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError:  # a torn write from a killed run: refetch
      log.warning("teacher cache entry %s is unreadable; refetching", path)
      return None

  def _cache_put(self, key: str, payload: dict[str, Any]):
    if self.cache_dir is None:
      return
    atomic_write_text(self._cache_path(key), json.dumps(payload))


class OpenAIChatPolicy:
  """The runner's `Policy` over a `ChatCompletionsClient`.

  Each sample is its own `n=1` request (sent concurrently): the endpoint's `usage` then gives every sample's exact
  token count, which the rollout log requires, and servers without `n` support work too. Sample j of a request's
  resample round r is cached under draw "r<r>s<j>". A response without `usage` is an error (the log needs the
  history and response lengths for compute accounting).
  """

  def __init__(self, client: ChatCompletionsClient, *, name: str | None = None, max_concurrency: int = 8):
    self.client = client
    self.name = name or f"teacher:{client.model}"
    self.max_concurrency = max_concurrency

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    del seed  # endpoints do not promise seeded sampling; the cache makes reruns reproducible instead
    jobs = [(i, j) for i, request in enumerate(requests) for j in range(request.n)]

    def one(job: tuple[int, int]) -> ChatResponse:
      request = requests[job[0]]
      reply = self.client.complete(list(request.messages), n=1, temperature=sampling.temperature,
                                   top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, top_k=sampling.top_k,
                                   draw=f"r{request.round}s{job[1]}")
      if reply.prompt_tokens is None or reply.completion_tokens is None:
        raise TeacherError(f"{self.client.base_url}: response without usage.prompt_tokens/completion_tokens "
                           f"(problem {request.key!r}, turn {request.turn})")
      return reply

    if len(jobs) <= 1 or self.max_concurrency <= 1:
      replies = [one(job) for job in jobs]
    else:
      with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(jobs))) as pool:
        replies = list(pool.map(one, jobs))
    samples: list[list[Sample]] = [[] for _ in requests]
    history = [0] * len(requests)
    for (i, _), reply in zip(jobs, replies):
      # The log knows stop | length; anything else an endpoint reports (content_filter, ...) ended the text early.
      reason = "length" if reply.finish_reasons[0] == "length" else "stop"
      samples[i].append(Sample(text=reply.texts[0], finish_reason=reason, token_ids=None,
                               num_tokens=reply.completion_tokens))
      history[i] = reply.prompt_tokens
    return [Completion(samples=tuple(s), history_tokens=h, prefill_tokens=None) for s, h in zip(samples, history)]

  def release(self, keys: Sequence[str]) -> None:
    del keys  # stateless

  def open_stream(self, seed: int) -> InstantStream:
    return InstantStream(self, seed)
