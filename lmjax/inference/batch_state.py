"""What the engine's decode program reads about each row and what it writes back, packed so
that a dispatch costs one host-to-device copy of each input table and one device-to-host
copy of its results, whatever the number of rows or steps.

Inputs, kept on the host and changed only when a row starts or ends: `ints` (slots,
INT_COLUMNS + stop ids) and `floats` (slots, 2). Results: one int32 array (rows, steps,
RECORD) per dispatch, a record per row and step: its status, the token, the top
alternatives' ids, and the float32 log-probabilities bitcast to int32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UserError
from lmjax.inference.decoder import TOP_LOGPROBS, seed_keys

Array = jax.Array
MAX_STOP_IDS = 4  # token ids that end a row (EOS, a chat template's end of turn, ...)
ACTIVE, LENGTH, GENERATED, BUDGET, TOP_K, LOGPROBS, KEY = range(7)  # KEY: 2 columns
STOPS = KEY + 2
TEMPERATURE, TOP_P = 0, 1
# A record's status: the row was idle; it drew a token to emit; it drew one of its stop ids
# (not emitted; the row ends); it drew its last token (emitted; the row ends).
IDLE, TOKEN, STOPPED, LAST = 0, 1, 2, 3
RECORD = 2 + 2 * TOP_LOGPROBS + 1  # status, token, top ids, log-probability, top ones


class RowTable:
  """The host's copy of every row's decoding inputs."""

  def __init__(self, slots: int):
    self.ints = np.zeros((slots, STOPS + MAX_STOP_IDS), np.int32)
    self.floats = np.zeros((slots, 2), np.float32)

  def start(self, row: int, prompt_len: int, budget: int, temperature: float, top_p: float,
            top_k: int, seed: int, stop_ids: Sequence[int], logprobs: bool = True) -> None:
    """Row `row` decodes from now on: its prompt's length, token budget, sampling, and
    whether it wants its tokens' log-probabilities."""
    stops = list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids))
    key = seed_keys([seed]).view(np.int32)[0]
    self.ints[row] = [1, prompt_len, 0, budget, top_k, int(logprobs), *key, *stops]
    self.floats[row] = temperature, top_p

  def end(self, row: int) -> None:
    self.ints[row, ACTIVE] = 0

  def active(self) -> np.ndarray:
    return self.ints[:, ACTIVE] > 0

  def remaining(self) -> np.ndarray:
    """(slots,) tokens each active row may still draw (a large number for idle rows)."""
    left = self.ints[:, BUDGET] - self.ints[:, GENERATED]
    return np.where(self.active(), left, np.iinfo(np.int32).max)


def check_stop_ids(stop_ids: Sequence[int]) -> None:
  if len(stop_ids) > MAX_STOP_IDS:
    raise UserError(f"a request takes at most {MAX_STOP_IDS} stop token ids, got "
                    f"{len(stop_ids)}")


def unpack_inputs(ints: Array, floats: Array) -> dict[str, Array]:
  """The decode program's view of the tables (each (rows,) but `keys` (rows, 2) and `stops`
  (rows, MAX_STOP_IDS))."""
  return {"active": ints[:, ACTIVE] > 0, "length": ints[:, LENGTH],
          "generated": ints[:, GENERATED], "budget": ints[:, BUDGET], "top_k": ints[:, TOP_K],
          "logprobs": ints[:, LOGPROBS] > 0,
          "keys": jax.lax.bitcast_convert_type(ints[:, KEY:KEY + 2], jnp.uint32),
          "stops": ints[:, STOPS:], "temperature": floats[:, TEMPERATURE],
          "top_p": floats[:, TOP_P]}


def pack_record(status: Array, tokens: Array, top_ids: Array, logprob: Array, top_lp: Array
                ) -> Array:
  """(rows,) status, tokens, log-probabilities and (rows, TOP_LOGPROBS) alternatives ->
  (rows, RECORD) int32."""
  as_int = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.concatenate([status[:, None], tokens[:, None], top_ids, as_int(logprob)[:, None],
                          as_int(top_lp)], axis=1).astype(jnp.int32)


def unpack_records(records: np.ndarray) -> dict[str, list]:
  """(rows, steps, RECORD) int32 from the device -> nested Python lists indexed [row][step]:
  status, token, logprob, top_ids and top_logprobs (TOP_LOGPROBS each)."""
  k = TOP_LOGPROBS
  floats = records.view(np.float32)
  return {"status": records[..., 0].tolist(), "token": records[..., 1].tolist(),
          "top_ids": records[..., 2:2 + k].tolist(), "logprob": floats[..., 2 + k].tolist(),
          "top_logprobs": floats[..., 3 + k:].tolist()}
