"""One entry per Hugging Face weight: its name, the lmjax parameters it feeds, and the
conversion both ways, so that one table serves import and export as exact inverses."""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Entry(NamedTuple):
  hf: str  # name in the Hugging Face state dict (without the family's prefix)
  paths: tuple[str, ...]  # lmjax parameter paths it feeds, '/'-joined
  to_lmjax: Callable[[np.ndarray], list[np.ndarray]]
  to_hf: Callable[[list[np.ndarray]], np.ndarray]


def same(hf, path):
  return Entry(hf, (path,), lambda a: [a], lambda xs: xs[0])


def linear(hf, path):  # torch Linear (out, in) <-> kernel (in, out)
  return Entry(hf, (path,), lambda w: [w.T], lambda xs: xs[0].T)


def heads_in(hf, path, heads):  # (H*Dh, D) <-> (D, H, Dh); bias (H*Dh,) <-> (H, Dh)
  if hf.endswith(".bias"):
    return Entry(hf, (path,), lambda b: [b.reshape(heads, -1)], lambda xs: xs[0].reshape(-1))
  return Entry(hf, (path,), lambda w: [w.T.reshape(w.shape[1], heads, -1)],
               lambda xs: xs[0].reshape(xs[0].shape[0], -1).T)


def heads_out(hf, path, heads):  # (D, H*Dh) <-> (H, Dh, D)
  return Entry(hf, (path,), lambda w: [w.T.reshape(heads, -1, w.shape[0])],
               lambda xs: xs[0].reshape(-1, xs[0].shape[-1]).T)


def norm(hf, path, bias=True):
  out = [same(f"{hf}.weight", f"{path}/norm/scale")]
  return out + [same(f"{hf}.bias", f"{path}/norm/bias")] if bias else out


def fused_rows(hf, paths, sizes, heads):
  """A torch Linear whose output rows stack several projections (Phi-3's qkv_proj, its
  gate_up_proj): split into per-projection kernels on import, joined on export. `sizes`:
  each part's rows; `heads`: each part's head count, or None for a plain (D, F) kernel."""
  cuts = np.cumsum(sizes)[:-1]

  def to_lmjax(w):  # (sum sizes, D)
    return [p.T if h is None else p.T.reshape(w.shape[1], h, -1)
            for p, h in zip(np.split(w, cuts, axis=0), heads)]

  def to_hf(xs):
    return np.concatenate([x.reshape(x.shape[0], -1).T for x in xs], axis=0)
  return Entry(hf, tuple(paths), to_lmjax, to_hf)


def expert_linear(hf, path, expert):
  """One expert's torch Linear (out, in) <-> row `expert` of a stacked (E, in, out) kernel:
  the lmjax path is `path[expert]`, which `hf.read_hf` stacks and `hf.export_hf` slices."""
  return Entry(hf, (f"{path}[{expert}]",), lambda w: [w.T], lambda xs: xs[0].T)
