"""Rollouts of an online objective (GRPO): prompts sampled by the serving engine with the
policy's current parameters, scored by the rewards, laid out as a training batch.

The engine (`lmjax.inference.engine.Engine`) is built once per run, its programs compiled
once; before each rollout it is pointed at the train state's parameters
(`Engine.update_params`: the device arrays the optimiser just wrote, not a copy) and
runs the step's requests to their ends on the training thread (`Engine.complete`), so
generation and updates alternate on the same devices, the engine's programs taking the
sharded parameters where they are (no copy to another process). One process only for
now: on several hosts the engine's programs would run over every host's devices while
each host has requests of its own, so a multi-host run is refused.

Every draw is a function of (seed, step): the step's prompts come from the keyed
permutation every dataset uses, and each reply samples with a seed of (train.seed, the
step of its rollout, its row), so a resumed run samples what the uninterrupted one did.
With `num_iterations` > 1 the batch of a rollout is kept in WORKDIR/rollouts until the
next, so a run resumed between them optimises the same batch again.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from lmjax import paths
from lmjax.data import chat
from lmjax.data.jsonl import read_json_lines
from lmjax.data.permutation import epoch_order
from lmjax.errors import UserError
from lmjax.objectives import rewards as reward_lib


@dataclasses.dataclass(frozen=True)
class Prompt:
  where: str  # path:line
  prompt: Any  # as the record gives it (text or messages): what a reward sees
  record: dict
  ids: tuple[int, ...]  # rendered with the chat template, ready for the reply


def read_prompts(path: str, tokenizer: Any, template: Any, room: int) -> list[Prompt]:
  """The prompts of a JSON-lines file: `prompt` (text: one user turn; or messages) or
  `messages`, rendered with the template's generation prompt; at most `room` tokens."""
  out = []
  for where, record in read_json_lines(path):
    given = record.get("prompt", record.get("messages"))
    if given is None:
      raise UserError(f"{where}: expected 'prompt' (text or messages) or 'messages'")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else given
    messages = chat.check_messages(messages, where, need_assistant=False)
    ids = tokenizer.encode_with_offsets(template.render(messages, True, where))[0]
    if len(ids) > room:
      raise UserError(f"{where}: the prompt has {len(ids)} tokens; data.seq_len minus "
                      f"objective.max_completion_tokens leaves {room}")
    out.append(Prompt(where, given, record, tuple(ids)))
  if not out:
    raise UserError(f"{path}: no prompts")
  return out


class Sampler:
  """The engine of a run, built at its first rollout (from the initial parameters' shapes),
  and the stop ids: the template's end of turn and end of sequence."""

  def __init__(self, objective: Any, tokenizer: Any, model: Any, seq_len: int):
    self.objective, self.model, self.seq_len = objective, model, seq_len
    special = tokenizer.special
    stops = {objective.template.end_of_turn(tokenizer), special.eos}
    self.stop_ids = tuple(sorted(i for i in stops if i >= 0))
    self.pad = max(special.pad, 0)
    self.decode = tokenizer.decode
    self.engine = None

  def generate(self, params: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
               temperature: float) -> list[tuple[list[int], int | None]]:
    """Each prompt's reply: (token ids without the stop token, the stop token or None)."""
    from lmjax.inference.engine import Engine, Request
    cfg = self.objective.cfg
    if self.engine is None:
      wrap = None
      if self.objective.adapters is not None:  # LoRA: the policy is the base + its adapters
        from lmjax.lora import LoraModel
        wrap = lambda model: LoraModel(model, self.objective.adapters)
      self.engine = Engine(self.model, self.objective.reference, self.pad, slots=len(prompts),
                           max_len=self.seq_len,
                           steps_per_dispatch=min(cfg.max_completion_tokens, 64),
                           wrap_model=wrap)
    self.engine.update_params(params)
    outs: list[list[int]] = [[] for _ in prompts]
    collect = lambda k: (lambda e: outs[k].append(e[1]) if e[0] == "token" else None)
    requests = [Request(list(p), cfg.max_completion_tokens, collect(k), temperature=temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, seed=int(s), token_logprobs=False,
                        stop_ids=self.stop_ids) for k, (p, s) in enumerate(zip(prompts, seeds))]
    self.engine.complete(requests)
    return [(o, r.stop_id) for o, r in zip(outs, requests)]


def datasets(objective: Any, seq_len: int, tokenizer: Any, model: Any, seed: int
             ) -> tuple["Rollouts", "Rollouts"]:
  """(train, eval) rollouts of `objective` (a GRPO) over its task files."""
  if jax.process_count() > 1:
    raise UserError("objective grpo runs in one process (on all its devices); several hosts "
                    "would each need their rows' replies from an engine of their own")
  cfg, task = objective.cfg, objective.task
  room = seq_len - cfg.max_completion_tokens
  if room < 1:
    raise UserError(f"objective.max_completion_tokens={cfg.max_completion_tokens} leaves no "
                    f"room for a prompt in data.seq_len={seq_len}")
  options = dataclasses.asdict(cfg)
  fns = {name: reward_lib.reward_function(name, options) for name in cfg.rewards}
  sampler = Sampler(objective, tokenizer, model, seq_len)
  made = []
  for split, path in (("train", task.train_file), ("eval", task.eval_file)):
    prompts = read_prompts(path, tokenizer, objective.template, room)
    logging.info("%s %s: %d prompts", split, path, len(prompts))
    made.append(Rollouts(objective, sampler, fns, prompts, seed, split == "train"))
  return made[0], made[1]


class Rollouts:
  """Batches of replies to prompts, a pure function of (seed, step) and the parameters
  `bind` gave (the loop binds the train state's before each step and each evaluation)."""

  online = True

  def __init__(self, objective: Any, sampler: Sampler, fns: dict, prompts: list[Prompt],
               seed: int, train: bool):
    self.objective, self.sampler, self.fns = objective, sampler, fns
    self.prompts, self.seed, self.train = prompts, seed, train
    self.params, self.workdir = None, None
    self._kept: tuple[int, dict] | None = None  # (rollout, batch) for num_iterations > 1
    self._last = None  # when the previous rollout ended (the update ran since)
    self.num_examples = len(prompts)

  def bind(self, params: Any, workdir: str | None = None) -> None:
    self.params, self.workdir = params, workdir

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    cfg = self.objective.cfg
    g, per = cfg.num_generations, global_batch // process_count
    if per % g:
      raise UserError(f"train.batch_size={global_batch} (replies per step, {per} per process) "
                      f"is not a multiple of objective.num_generations={g}")
    jax.block_until_ready(self.params)  # the update before is timed as the update's
    began = time.perf_counter()
    update = began - self._last if self._last is not None else 0.0
    rollout = step // cfg.num_iterations
    out = self._kept[1] if self._kept and self._kept[0] == rollout else self._load(rollout)
    fresh = out is None
    if fresh:
      start = rollout * (global_batch // g) + process_index * (per // g)
      ids = np.repeat(epoch_order(start, per // g, self.num_examples, self.seed), g)
      rows = process_index * per + np.arange(per)
      out = self._sample(ids, [_seed(self.seed, rollout, r) for r in rows], cfg.temperature)
      out.update(self._logps(out))
      self._save(rollout, out)
    self._kept = (rollout, out)
    self._last = time.perf_counter()
    seconds = (self._last - began) if fresh else 0.0
    return {**out, "rollout_seconds": np.full(per, seconds / per, np.float32),
            "update_seconds": np.full(per, update / per, np.float32)}

  def eval_batch(self, index: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]:
    """One greedy reply to each held-out prompt, in order (padding rows weigh 0)."""
    per = global_batch // process_count
    ids = np.arange(per) + index * global_batch + process_index * per
    ids = np.where(ids < self.num_examples, ids, -1)
    out = self._sample(ids, [0] * per, 0.0)
    zeros = np.zeros(out["tokens"].shape, np.float32)
    return {**out, "old_logps": zeros, "ref_logps": zeros,
            "rollout_seconds": np.zeros(per, np.float32),
            "update_seconds": np.zeros(per, np.float32)}

  def num_eval_batches(self, global_batch: int) -> int:
    return -(-self.num_examples // global_batch)

  def _sample(self, ids: np.ndarray, seeds: Sequence[int], temperature: float
              ) -> dict[str, np.ndarray]:
    """Replies to prompts `ids` (-1: a padding row), scored, as (rows, T) arrays."""
    cfg, real = self.objective.cfg, np.flatnonzero(ids >= 0)
    prompts = [self.prompts[i] for i in ids[real]]
    got = self.sampler.generate(self.params, [p.ids for p in prompts],
                                [seeds[i] for i in real], temperature)
    completions = [reward_lib.Completion.of(self.sampler.decode(t), t + ([] if stop is None
                                                                        else [stop]),
                                            stop is not None) for t, stop in got]
    scores = reward_lib.score(self.fns, [p.prompt for p in prompts], completions,
                              [p.record for p in prompts], [p.where for p in prompts])
    out = layout([p.ids for p in prompts], [c.ids for c in completions],
                 self.sampler.seq_len, self.sampler.pad, real, len(ids))
    rewards = np.zeros((len(ids), len(self.fns)), np.float32)
    rewards[real] = scores
    weights = np.asarray(cfg.reward_weights or [1.0] * len(self.fns), np.float64)
    total, adv, zero = (np.zeros(len(ids), np.float32) for _ in range(3))
    if self.train:
      total, adv, zero = self.objective.group_advantages(scores, weights)
    else:
      total[real] = (scores * weights).sum(axis=1)
    stopped = np.zeros(len(ids), np.float32)
    stopped[real] = [stop is not None for _, stop in got]
    return {**out, "rewards": rewards, "reward": total, "advantages": adv, "zero_std": zero,
            "stopped": stopped}

  def _logps(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sampling policy's log-probabilities (num_iterations > 1) and the reference's
    (beta > 0) of each next token: what the steps on this batch compare with."""
    cfg, objective = self.objective.cfg, self.objective
    zeros = np.zeros(out["tokens"].shape, np.float32)
    if cfg.num_iterations == 1 and not cfg.beta:
      return {"old_logps": zeros, "ref_logps": zeros}
    if not hasattr(self.sampler, "logps"):
      self.sampler.logps = jax.jit(objective.next_token_logps)
    run = lambda p: np.asarray(self.sampler.logps(p, out["tokens"], out["segment_ids"],
                                                  out["positions"]), np.float32)
    return {"old_logps": run(self.params) if cfg.num_iterations > 1 else zeros,
            "ref_logps": run(objective.kl_reference(self.params)) if cfg.beta else zeros}

  def _file(self, rollout: int) -> str | None:
    if self.objective.cfg.num_iterations == 1 or not self.workdir or not self.train:
      return None
    return paths.join(self.workdir, "rollouts", f"{rollout}.{jax.process_index()}.npz")

  def _load(self, rollout: int) -> dict[str, np.ndarray] | None:
    path = self._file(rollout)
    if path is None or not paths.exists(path):
      return None
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}

  def _save(self, rollout: int, out: dict[str, np.ndarray]) -> None:
    """Kept until the next rollout: a run resumed before it optimises this batch again."""
    path = self._file(rollout)
    if path is None:
      return
    folder = paths.dirname(path)
    paths.makedirs(folder)
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    paths.write_atomic(path, buffer.getvalue())
    for name in paths.listdir(folder):
      if name.endswith(f".{jax.process_index()}.npz") and name != path.rsplit("/", 1)[-1]:
        paths.remove(paths.join(folder, name))


def layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           seq_len: int, pad: int, rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
  """Prompt + reply in rows `rows` of (n, seq_len) arrays, left-aligned; the others (padding
  rows) empty, weight 0."""
  tokens = np.full((n, seq_len), pad, np.int32)
  segments, mask = np.zeros_like(tokens), np.zeros_like(tokens)
  lengths, weights = np.zeros(n, np.float32), np.zeros(n, np.float32)
  for i, p, c in zip(rows, prompts, completions):
    both = list(p) + list(c)
    tokens[i, :len(both)] = both
    segments[i, :len(both)] = 1
    mask[i, len(p):len(both)] = 1
    lengths[i], weights[i] = len(c), 1.0
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape) * segments
  return {"tokens": tokens, "segment_ids": segments, "positions": positions.astype(np.int32),
          "completion_mask": mask, "completion_length": lengths, "weights": weights}


def _seed(seed: int, rollout: int, row: int) -> int:
  """A reply's sampling seed: a function of the run's seed, its rollout and its row."""
  words = np.random.SeedSequence([seed, rollout, row]).generate_state(2, np.uint32)
  return int(words[0]) << 32 | int(words[1])
