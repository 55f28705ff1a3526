"""launch.serve through real clients: the `openai` package (chat, completions, streaming,
n > 1), lm-evaluation-harness's `local-completions` (the same numbers as launch.lm_eval's
harness), greedy replies equal to launch.generate's; the bearer key, bad input, a client
that disconnects mid-stream, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON tasks: nothing to download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import pytest

from tiny import ROOT

KEY = "test-key-123"
INCLUDE = os.path.join(ROOT, "tests", "lm_eval_tasks")


@pytest.fixture(scope="module")
def served(tiny_runs, tmp_path_factory):
  """(base URL, run directory) of one server with a key, shared by the module's tests."""
  from lmjax.inference.serve_process import spawn
  log = open(tmp_path_factory.mktemp("serve") / "stderr.txt", "w")
  workdir = str(tiny_runs / "clm_tiny")
  proc, url = spawn(workdir, f"--api_key={KEY}", "--max_batch=4", "--prefill_chunk=16",
                    log=log)
  yield url, workdir
  os.killpg(proc.pid, signal.SIGTERM)
  assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def client(served):
  import openai
  return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _launch(*args: str) -> str:
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_openai_client_chat_completions_streaming_and_n(client):
  models = client.models.list()
  assert [m.id for m in models.data] == ["clm_tiny"]
  done = client.completions.create(model="clm_tiny", prompt="ROMEO.", max_tokens=12,
                                   temperature=0)
  assert done.choices[0].finish_reason in ("length", "stop")
  assert 1 <= done.usage.completion_tokens <= 12
  assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
  streamed = list(client.completions.create(model="clm_tiny", prompt="ROMEO.", max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
  assert streamed[-1].usage.completion_tokens == done.usage.completion_tokens
  assert not streamed[-1].choices and all(c.usage is None for c in streamed[:-1])
  chat = client.chat.completions.create(
      model="clm_tiny", messages=[{"role": "user", "content": "Who is there?"}], max_tokens=10,
      temperature=0)
  assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 5
  chunks = list(client.chat.completions.create(
      model="clm_tiny", messages=[{"role": "user", "content": "Who is there?"}], max_tokens=10,
      temperature=0, stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == chat.choices[0].message.content
  assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
      chat.choices[0].finish_reason
  many = client.completions.create(model="clm_tiny", prompt=["ROMEO.", "JULIET."], n=3,
                                   max_tokens=8, temperature=1.0, seed=5)
  assert sorted(c.index for c in many.choices) == list(range(6))
  again = client.completions.create(model="clm_tiny", prompt=["ROMEO.", "JULIET."], n=3,
                                    max_tokens=8, temperature=1.0, seed=5)
  texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
  assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]  # seeded
  assert len(set(texts[:3])) > 1  # the n choices of a prompt differ
  assert many.usage.completion_tokens == 6 * 8


def test_openai_clients_documented_streaming_loop(client):
  """The loop in the `openai` client's README reads `chunk.choices[0]` of every chunk: no
  chunk may come without a choice unless the request asked for the usage chunk."""
  text = ""
  for chunk in client.chat.completions.create(
      model="clm_tiny", messages=[{"role": "user", "content": "Who is there?"}], max_tokens=10,
      temperature=0, stream=True):
    text += chunk.choices[0].delta.content or ""
    assert chunk.usage is None
  pieces = [chunk.choices[0].text for chunk in client.completions.create(
      model="clm_tiny", prompt="ROMEO.", max_tokens=10, temperature=0, stream=True)]
  assert text and "".join(pieces) == client.completions.create(
      model="clm_tiny", prompt="ROMEO.", max_tokens=10, temperature=0).choices[0].text


def test_stop_strings_and_logprobs(client):
  free = client.completions.create(model="clm_tiny", prompt="ROMEO.", max_tokens=16,
                                   temperature=0, logprobs=2)
  text = free.choices[0].text
  cut = text[3:6]
  stopped = client.completions.create(model="clm_tiny", prompt="ROMEO.", max_tokens=16,
                                      temperature=0, stop=[cut])
  assert stopped.choices[0].text == text[:text.index(cut)]
  assert stopped.choices[0].finish_reason == "stop"
  lp = free.choices[0].logprobs
  assert "".join(lp.tokens) == text and len(lp.token_logprobs) == 16
  assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6
             for t, v in zip(lp.top_logprobs, lp.token_logprobs))
  echo = client.completions.create(model="clm_tiny", prompt="ROMEO. Good", max_tokens=1,
                                   temperature=0, echo=True, logprobs=1)
  assert echo.choices[0].text.startswith("ROMEO. Good")
  assert echo.choices[0].logprobs.token_logprobs[0] is None  # the first token has no context


def test_lm_eval_local_completions_equals_launch_lm_eval(served, tmp_path):
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lmjax import harness, pretrained
  from lmjax.convert import export_hf
  url, workdir = served
  os.chdir(ROOT)  # the task files name their data relative to the checkout
  exported = tmp_path / "hf"  # for its tokenizer (launch.convert itself: test_use_models.py)
  export_hf(pretrained.load(workdir), str(exported))
  tasks = ["lmjax_mc", "lmjax_ppl"]
  os.environ["OPENAI_API_KEY"] = KEY  # lm-eval's local-completions sends it as the bearer key
  max_len = pretrained.load(workdir).model.max_len
  theirs = lm_eval.simple_evaluate(
      model="local-completions",
      model_args=f"model=clm_tiny,base_url={url}/v1/completions,tokenizer={exported},"
                 f"tokenizer_backend=huggingface,add_bos_token=True,max_length={max_len + 1},"
                 "num_concurrent=4,max_retries=1",
      tasks=tasks, task_manager=TaskManager(include_path=INCLUDE, include_defaults=False),
      log_samples=True)
  ours = harness.run(pretrained.load(workdir), tasks, batch_size=4, include_path=INCLUDE,
                     log_samples=True)
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["lmjax_mc"][metric] == theirs["results"]["lmjax_mc"][metric]
  for metric in ("word_perplexity,none", "byte_perplexity,none"):
    assert ours["results"]["lmjax_ppl"][metric] == pytest.approx(
        theirs["results"]["lmjax_ppl"][metric], rel=1e-5)
  for task in tasks:
    key = lambda s: s["doc_id"]
    a = [s["resps"] for s in sorted(ours["samples"][task], key=key)]
    b = [s["resps"] for s in sorted(theirs["samples"][task], key=key)]
    first = lambda r: r[0][0] if isinstance(r[0], (list, tuple)) else r[0]
    la = np.array([[first(r) for r in row] for row in a], float)
    lb = np.array([[first(r) for r in row] for row in b], float)
    assert la.shape == lb.shape and la.size > 10
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)


def test_greedy_replies_equal_launch_generate(served, client):
  url, workdir = served
  # one greedy prompt (a launch.generate process costs ~10 CPU-s); "ROMEO." is sampled below
  prompt = "First Citizen:\nBefore we proceed"
  out = _launch("launch.generate", f"--workdir={workdir}", f"--prompt={prompt}",
                "--temperature=0", "--max_new_tokens=20")
  served_text = client.completions.create(model="clm_tiny", prompt=prompt, max_tokens=20,
                                          temperature=0).choices[0].text
  assert out == prompt + served_text + "\n"
  # sampled, with top-k and top-p both set: one sampler (top-p on what top-k kept), one seed
  sampling = dict(temperature=1.0, top_p=0.6, seed=3)
  out = _launch("launch.generate", f"--workdir={workdir}", "--prompt=ROMEO.", "--top_k=5",
                *(f"--{k}={v}" for k, v in sampling.items()), "--max_new_tokens=24")
  served_text = client.completions.create(model="clm_tiny", prompt="ROMEO.", max_tokens=24,
                                          extra_body={"top_k": 5}, **sampling).choices[0].text
  assert out == "ROMEO." + served_text + "\n"
  out = _launch("launch.generate", f"--workdir={workdir}", "--chat", "--prompt=Who is there?",
                "--temperature=0", "--max_new_tokens=20")
  reply = client.chat.completions.create(
      model="clm_tiny", messages=[{"role": "user", "content": "Who is there?"}], max_tokens=20,
      temperature=0).choices[0].message.content
  assert out == reply + "\n"


def test_every_request_without_the_key_gets_401(served):
  url, _ = served
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/health", None),
                               ("POST", "/v1/completions", {"prompt": "hi"}),
                               ("POST", "/v1/chat/completions", "{not json"),
                               ("GET", "/nothing/here", None)):
      r = httpx.request(method, url + path, headers=headers, timeout=30,
                        **({"json": body} if isinstance(body, dict) else {"content": body}))
      assert r.status_code == 401, (headers, path)
      assert r.json()["error"]["type"] == "authentication_error"
  assert url.startswith("http://127.0.0.1:")  # listens on the loopback unless told otherwise


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(served):
  url, _ = served
  auth = {"Authorization": f"Bearer {KEY}"}
  post = lambda path, headers=auth, **kw: httpx.post(url + path, headers=headers, timeout=30, **kw)
  cases = [
      (post("/v1/completions", content="{bad json", headers={**auth,
                                                             "content-type": "application/json"}),
       400, "not valid JSON"),
      (post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"}), 400, "max_tokens"),
      (post("/v1/completions", json={"prompt": "hi", "temperature": [1]}), 400, "temperature"),
      (post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}), 400, "max_tokens"),
      (post("/v1/completions", json={"prompt": "hi", "max_tokens": -3}), 400, "max_tokens"),
      (post("/v1/completions", json={"prompt": "hi " * 400}), 413, "maximum context length"),
      (post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                        "content": "hi " * 400}]}),
       413, "maximum context length"),
      (post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"}), 404, "gpt-4"),
      (post("/v1/completions", json={"prompt": [10 ** 9]}), 400, "token ids"),
      (post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
      (post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
       400, "messages"),
      (post("/v1/completions", json={"prompt": "hi", "logprobs": 9}), 400, "logprobs"),
      (post("/v1/completions", json={"prompt": "hi", "presence_penalty": 1}), 400, "penalty"),
      (post("/v1/completions", content=b"x" * (9 << 20)), 413, "exceeds"),
  ]
  for response, status, words in cases:
    assert response.status_code == status, (status, words, response.text)
    assert words in response.json()["error"]["message"] or words == response.json()["error"][
        "param"], response.text
  fine = post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "user": "ignored",
                                       "temperature": 0})
  assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] >= 1


def _busy_rows(url: str) -> int:
  r = httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
  return r.json()["busy_rows"]


def test_a_client_that_disconnects_mid_stream_is_cleaned_up(served):
  url, _ = served
  # 16 choices of 250 tokens on 4 rows: seconds of work, far more than the client takes to
  # read its first chunk and hang up (one long choice alone can end first on a fast engine).
  body = {"prompt": "ROMEO.", "max_tokens": 250, "temperature": 0.9, "seed": 1, "n": 16,
          "stream": True}
  with httpx.Client(timeout=60) as http:
    with http.stream("POST", url + "/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {KEY}"}) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      assert _busy_rows(url) == 4
  deadline = time.monotonic() + 30
  while _busy_rows(url) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _busy_rows(url) == 0  # the rows were freed long before 16 x 250 tokens
  again = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO.", "max_tokens": 2},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
  assert again.status_code == 200


def test_sigterm_finishes_running_requests_and_exits_0(tiny_runs, tmp_path):
  from lmjax.inference.serve_process import spawn
  proc, url = spawn(str(tiny_runs / "clm_tiny"), "--max_batch=2", log=open(tmp_path / "e", "w"))
  chunks: list[dict] = []

  def stream():
    body = {"prompt": "ROMEO.", "max_tokens": 200, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
      for line in r.iter_lines():
        if line.startswith("data: {"):
          chunks.append(json.loads(line[6:]))
  reader = threading.Thread(target=stream)
  reader.start()
  deadline = time.monotonic() + 60
  while not chunks and time.monotonic() < deadline:
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGTERM)
  assert proc.wait(90) == 0
  reader.join(60)
  finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
  assert finishes[-1] in ("length", "stop")  # it ran to its end: not cut off
  assert chunks[-1]["usage"]["completion_tokens"] > 10
  with pytest.raises(httpx.TransportError):
    httpx.get(url + "/health", timeout=5)


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads(tiny_runs):
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "launch.serve",
                          f"--workdir={tiny_runs / 'clm_tiny'}", f"--port={port}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert f"cannot listen on 127.0.0.1:{port}" in out.stderr.strip().splitlines()[-1]
