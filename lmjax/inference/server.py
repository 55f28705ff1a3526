"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI).

  POST /v1/chat/completions   messages through the model's chat template
  POST /v1/completions        prompt(s) as text or token ids; `echo` + `logprobs` score them
  GET  /v1/models             the one model served
  GET  /health                200 while the engine runs (503 once it has failed)

Every choice of every request is one engine request (one cache row); `n` choices of a
prompt are `n` rows with seeds seed, seed+1, ... Responses stream as server-sent
events in OpenAI's chunk format; with `stream_options: {"include_usage": true}` a last
chunk with empty `choices` carries the usage counts (as OpenAI and vLLM send it: only when
asked, since clients read `chunk.choices[0]` of every other chunk). A client that
disconnects has its rows freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmjax.errors import UserError
from lmjax.inference import openai_api as api
from lmjax.inference.choice_state import ChoiceState, Inbox
from lmjax.inference.engine import Engine, Request
from lmjax.inference.generation_config import GenerationDefaults
from lmjax.inference.phases import Phases

MAX_BODY_BYTES = 8 << 20


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code


@dataclasses.dataclass
class Served:
  """The model behind the endpoint: engine, tokenizer and chat template."""
  engine: Engine
  tokenizer: Any
  template: Any  # lmjax.data.chat.ChatTemplate
  name: str
  created: int = 0
  # the event loop's time: engine events waiting for it, turning tokens into text (and stop
  # strings), and writing chunks
  phases: Phases = dataclasses.field(default_factory=lambda: Phases(
      ("queue_wait", "detokenize", "encode"), ("events", "chunks")))
  # generation_config.json's sampling defaults and eos ids (None: OpenAI's defaults and the
  # tokenizer's eos)
  generation: GenerationDefaults | None = None

  @property
  def special(self):
    return self.tokenizer.special

  def eos_ids(self) -> tuple[int, ...]:
    """The ids that end a completion."""
    if self.generation is not None and self.generation.eos_ids:
      return self.generation.eos_ids
    return (self.special.eos,) if self.special.eos >= 0 else ()

  def end_of_turn(self) -> tuple[int, ...]:
    """The ids that end a chat reply: the template's end of turn and the eos ids."""
    ids = (self.template.end_of_turn(self.tokenizer), *self.eos_ids())
    return tuple(i for i in dict.fromkeys(ids) if i >= 0)

  def sampling(self, body: api._Body) -> dict[str, Any]:
    """A request's temperature, top_p and top_k: those it sets, else the model's
    generation_config.json's, else OpenAI's defaults (the request's own)."""
    given = body.model_fields_set
    use_model = self.generation is not None and self.generation.source
    return {k: getattr(self.generation if use_model and k not in given else body, k)
            for k in ("temperature", "top_p", "top_k")}


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
  """Each token's text as it appears in the decoded whole (leading spaces included)."""
  out, before = [], ""
  for k in range(len(ids)):
    now = tokenizer.decode(ids[:k + 1])
    out.append(now[len(before):] if now.startswith(before) else tokenizer.decode([ids[k]]))
    before = now
  return out


async def _drive(choice: ChoiceState, request: Request, inbox: Inbox, out: asyncio.Queue,
                 ph: Phases) -> None:
  """Feeds one engine request's events to its choice, a batch at a time; puts (choice,
  released text, finish reason or None) on `out`, the finish reason on its last item."""
  try:
    while choice.finish is None:
      batch = await inbox.take()
      t = time.perf_counter()
      ph.seconds["queue_wait"] += sum(t - emitted for emitted, _ in batch)
      text = choice.handle([event for _, event in batch])
      ph.since("detokenize", t)
      ph.count("events", len(batch))
      if text or choice.finish:
        await out.put((choice, text, choice.finish))
  finally:
    request.cancel()  # a stop string, a disconnect or a shutdown: free the row


class Completion:
  """The choices of one API request, running concurrently in the engine."""

  def __init__(self, served: Served, body: api._Body, prompts: list[list[int]], max_tokens: int,
               stop_ids: tuple[int, ...], echo_logprobs: bool = False,
               token_logprobs: bool = False):
    self.served, self.n, self.out = served, body.n, asyncio.Queue()
    self.choices: list[ChoiceState] = []
    self.tasks: list[asyncio.Future] = []
    loop = asyncio.get_running_loop()
    submitted: list[Request] = []
    try:
      for p, prompt in enumerate(prompts):
        for j in range(body.n):
          choice = ChoiceState(p * body.n + j, served.tokenizer, prompt, body.stops())
          inbox = Inbox(loop)
          request = Request(
              prompt, max_tokens, inbox.put, **served.sampling(body),
              seed=None if body.seed is None else (body.seed + j) % 2 ** 64,
              echo_logprobs=echo_logprobs, token_logprobs=token_logprobs, stop_ids=stop_ids)
          served.engine.submit(request)
          submitted.append(request)
          self.choices.append(choice)
          self.tasks.append(asyncio.ensure_future(
              _drive(choice, request, inbox, self.out, served.phases)))
    except BaseException:
      for r in submitted:
        r.cancel()
      raise

  async def updates(self) -> AsyncIterator[tuple[ChoiceState, str, str | None]]:
    """(choice, released text, finish reason on its last item) until every choice has
    finished; what still runs is cancelled if the consumer goes away."""
    try:
      for _ in range(sum(1 for _ in self.choices)):
        while True:
          item = await self.out.get()
          yield item
          if item[2] is not None:
            break
    finally:
      for t in self.tasks:
        t.cancel()

  def usage(self) -> dict[str, int]:
    prompt_tokens = sum(len(c.prompt) for c in self.choices[::self.n])  # each prompt once
    return api.usage(prompt_tokens, sum(len(c.ids) for c in self.choices))


def _check_model(served: Served, body: api._Body) -> None:
  if body.model not in (None, served.name):
    raise ApiError(404, f"The model `{body.model}` does not exist; this server serves "
                   f"`{served.name}`", "model", "model_not_found")
  reason = body.unsupported()
  if reason:
    raise ApiError(400, reason)


def _budget(served: Served, prompts: list[list[int]], max_tokens: int | None) -> int:
  """The token budget of each choice; a prompt the context cannot hold is a 413."""
  limit = served.engine.max_len
  longest = max(len(p) for p in prompts)
  if longest > limit or min(len(p) for p in prompts) == 0:
    raise ApiError(413, f"This model's maximum context length is {limit} tokens; the prompt "
                   f"has {longest}" if longest else "the prompt is empty", "prompt",
                   "context_length_exceeded")
  if max_tokens is not None and max_tokens <= 0:
    raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
  room = limit + 1 - longest  # the last new token is never fed back
  return room if max_tokens is None else min(max_tokens, room)


def _sse(data: Any) -> str:
  return f"data: {json.dumps(data)}\n\n"


def _completion_prompts(served: Served, prompt: Any) -> tuple[list[list[int]], list[str]]:
  """Token ids and text of each prompt: text gets [bos] in front (as training did)."""
  if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    bos = [served.special.bos] if served.special.bos >= 0 else []
    return [bos + ids for ids in served.tokenizer.encode(texts)], texts
  rows = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
  vocab = served.engine.cfg.vocab_size
  if any(not 0 <= t < vocab for row in rows for t in row):
    raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
  return [list(r) for r in rows], [served.tokenizer.decode(r) for r in rows]


def _completion_logprobs(served: Served, c: ChoiceState, k: int, echo: bool, offset: int
                         ) -> dict[str, Any]:
  """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
  tok = served.tokenizer
  lps, tops = ([], []) if not echo else c.prompt_logprobs or ([], [])
  pieces = _pieces(tok, c.prompt) if echo else []
  kept = len(c.ids)
  gen_pieces = _pieces(tok, c.ids)
  while kept and len("".join(gen_pieces[:kept - 1])) >= len(c.text.text):
    kept -= 1  # tokens wholly after a stop string
  pieces += gen_pieces[:kept]
  lps = list(lps) + [lp for lp, _ in c.logprobs[:kept]]
  tops = list(tops) + [top for _, top in c.logprobs[:kept]]
  top_dicts = [None if t is None else {tok.decode([i]): lp for i, lp in t[:max(k, 1)]}
               for t in tops]
  offsets, at = [], offset
  for piece in pieces:
    offsets.append(at)
    at += len(piece)
  return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": top_dicts,
          "text_offset": offsets}


def _chat_logprobs(served: Served, c: ChoiceState, k: int) -> dict[str, Any]:
  tok = served.tokenizer
  entry = lambda i, lp: {"token": tok.decode([i]), "logprob": lp,
                         "bytes": list(tok.decode([i]).encode())}
  return {"content": [dict(entry(i, lp), top_logprobs=[entry(j, l) for j, l in top[:k]])
                      for i, (lp, top) in zip(c.ids, c.logprobs)]}


async def _collect(completion: Completion, http: HttpRequest) -> None:
  """Runs every choice to its end; a client that goes away cancels them."""
  async def drain():
    async for _ in completion.updates():
      pass
  task = asyncio.ensure_future(drain())
  try:
    while not task.done():
      await asyncio.wait([task], timeout=1.0)
      if not task.done() and await http.is_disconnected():
        raise ApiError(400, "the client disconnected")
    task.result()
  finally:
    task.cancel()


def create_app(served: Served, api_key: str | None = None) -> FastAPI:
  """The FastAPI application; the engine must have been started."""
  app = FastAPI(title="lmjax", docs_url=None, redoc_url=None, openapi_url=None)
  _install_guards(app, served, api_key)

  @app.get("/health")
  async def health():
    if served.engine.error is not None:
      return JSONResponse(api.error_body("the engine has stopped", "server_error"), 503)
    engine = served.engine
    return {"status": "ok", "model": served.name, "rows": engine.slots,
            "busy_rows": engine.busy_rows(), "max_len": engine.max_len,
            "prefill_chunk": engine.chunk, "kv_cache_bytes": engine.cache_bytes(),
            "decode_steps": engine.steps, "prefill_chunks": engine.chunks,
            "profile": {"engine": engine.phases.snapshot(),
                        "server": dict(served.phases.snapshot(),
                                       thread_cpu_s=time.thread_time())}}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": served.name, "object": "model",
                                        "created": served.created, "owned_by": "lmjax",
                                        "max_model_len": served.engine.max_len}]}

  @app.post("/v1/completions")
  async def completions(body: api.CompletionRequest, http: HttpRequest):
    return await _completions(served, body, http)

  @app.post("/v1/chat/completions")
  async def chat(body: api.ChatRequest, http: HttpRequest):
    return await _chat(served, body, http)

  return app


class _Guard:
  """The bearer key and the body size limit, checked before a request reaches the app. A
  plain ASGI middleware: Starlette's `@app.middleware("http")` passes every chunk of a
  streamed reply through a memory stream between two tasks, a cost per server-sent chunk."""

  def __init__(self, app: Any, api_key: str | None):
    self.app, self.api_key = app, api_key

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    refusal = self._refusal(dict(scope["headers"])) if scope["type"] == "http" else None
    await (refusal or self.app)(scope, receive, send)

  def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
    if self.api_key is not None:
      given = headers.get(b"authorization", b"")
      if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
        return JSONResponse(api.error_body("Incorrect or missing API key (Authorization: "
                                           "Bearer KEY)", "authentication_error",
                                           code="invalid_api_key"), 401)
    size = headers.get(b"content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
      return JSONResponse(api.error_body(f"the request body exceeds {MAX_BODY_BYTES} bytes"),
                          413)
    return None


def _install_guards(app: FastAPI, served: Served, api_key: str | None) -> None:
  """The bearer key, the body size limit and OpenAI-style errors."""
  app.add_middleware(_Guard, api_key=api_key)

  @app.exception_handler(RequestValidationError)
  async def invalid(http: HttpRequest, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
      return JSONResponse(api.error_body(f"the body is not valid JSON: {first['msg']}"), 400)
    return JSONResponse(api.error_body(f"{where or 'body'}: {first['msg']}",
                                       param=where or None), 400)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(http: HttpRequest, e: StarletteHTTPException):
    return JSONResponse(api.error_body(str(e.detail)), e.status_code)

  @app.exception_handler(ApiError)
  async def refused(http: HttpRequest, e: ApiError):
    return JSONResponse(api.error_body(e.message, param=e.param, code=e.code), e.status)

  @app.exception_handler(UserError)
  async def user_error(http: HttpRequest, e: UserError):
    return JSONResponse(api.error_body(str(e)), 400)

  @app.exception_handler(RuntimeError)
  async def stopped(http: HttpRequest, e: RuntimeError):
    return JSONResponse(api.error_body(str(e), "server_error"), 503)


async def _completions(served: Served, body: api.CompletionRequest, http: HttpRequest):
  _check_model(served, body)
  prompts, texts = _completion_prompts(served, body.prompt)
  budget = _budget(served, prompts, body.max_tokens)
  scored = body.echo and body.logprobs is not None
  completion = Completion(served, body, prompts, budget, served.eos_ids(),
                          echo_logprobs=scored, token_logprobs=body.logprobs is not None)
  rid = api.new_id("cmpl")
  if body.stream:
    return StreamingResponse(_stream_completions(served, completion, rid, body, texts),
                             media_type="text/event-stream")
  await _collect(completion, http)
  choices = []
  for c in completion.choices:
    prefix = texts[c.index // body.n] if body.echo else ""
    lp = None if body.logprobs is None else _completion_logprobs(
        served, c, body.logprobs, body.echo, 0)
    choices.append({"index": c.index, "text": prefix + c.text.text, "logprobs": lp,
                    "finish_reason": c.finish})
  return api.envelope("text_completion", rid, served.name, choices, usage=completion.usage())


async def _stream_completions(served: Served, completion: Completion, rid: str, body,
                              texts: list[str]):
  echoed: set[int] = set()
  usage = _UsageChunks(body)
  async for choice, text, finish in completion.updates():
    if body.echo and choice.index not in echoed:
      echoed.add(choice.index)
      text = texts[choice.index // body.n] + text
    t = time.perf_counter()
    chunk = _sse(api.envelope("text_completion", rid, served.name, [
        {"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish}],
        **usage.every()))
    served.phases.since("encode", t)
    served.phases.count("chunks")
    yield chunk
  if usage.on:
    yield usage.last("text_completion", rid, served.name, completion)
  yield "data: [DONE]\n\n"


class _UsageChunks:
  """`stream_options.include_usage`: every chunk has `usage: null`, and a last chunk with
  empty `choices` has the counts (OpenAI's format); without it, neither."""

  def __init__(self, body: api._Body):
    self.on = body.stream_options is not None and body.stream_options.include_usage

  def every(self) -> dict[str, Any]:
    return {"usage": None} if self.on else {}

  def last(self, kind: str, rid: str, model: str, completion: Completion) -> str:
    return _sse(api.envelope(kind, rid, model, [], usage=completion.usage()))


def _chat_prompt(served: Served, body: api.ChatRequest) -> list[int]:
  try:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
  except ValueError as e:
    raise ApiError(400, str(e), "messages") from None
  try:
    text = served.template.render(messages, add_generation_prompt=True)
  except UserError as e:
    raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
  return served.tokenizer.encode_with_offsets(text)[0]


async def _chat(served: Served, body: api.ChatRequest, http: HttpRequest):
  _check_model(served, body)
  prompt = _chat_prompt(served, body)
  limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
  budget = _budget(served, [prompt], limit)
  completion = Completion(served, body, [prompt], budget, served.end_of_turn(),
                          token_logprobs=body.logprobs)
  rid = api.new_id("chatcmpl")
  if body.stream:
    return StreamingResponse(_stream_chat(served, completion, rid, body),
                             media_type="text/event-stream")
  await _collect(completion, http)
  choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
              "logprobs": _chat_logprobs(served, c, body.top_logprobs) if body.logprobs
              else None, "finish_reason": c.finish} for c in completion.choices]
  return api.envelope("chat.completion", rid, served.name, choices, usage=completion.usage())


async def _stream_chat(served: Served, completion: Completion, rid: str,
                       body: api.ChatRequest):
  kind = "chat.completion.chunk"
  usage = _UsageChunks(body)
  for c in completion.choices:  # the role first, as OpenAI sends it
    yield _sse(api.envelope(kind, rid, served.name, [
        {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}], **usage.every()))
  async for choice, text, finish in completion.updates():
    t = time.perf_counter()
    delta = {"content": text} if text else {}
    chunk = _sse(api.envelope(kind, rid, served.name, [
        {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **usage.every()))
    served.phases.since("encode", t)
    served.phases.count("chunks")
    yield chunk
  if usage.on:
    yield usage.last(kind, rid, served.name, completion)
  yield "data: [DONE]\n\n"
