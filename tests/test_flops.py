"""The FLOPs behind MFU: the formula equals the matmul FLOPs of the compiled train step."""

import functools

import jax
import jax.numpy as jnp
import pytest

from lmjax import objectives
from lmjax import train as train_lib
from lmjax.data.tokenizer import Tokenizer
from lmjax.experiment import experiment_from_dict
from lmjax.metrics import flops_per_token, lowered_dot_flops, traced_dot_flops
from tiny import tiny_config


def step_costs(name, tmp_path, arg=None, **overrides):
  # Unrolled and dense attention: a loop body (scanned layers, blockwise attention's key
  # blocks) counts once in the HLO; the formula counts attention as dense XLA computes it.
  config = tiny_config(name, tmp_path, arg, model__scan_layers=False,
                       model__attention_impl="xla", **overrides)
  exp = experiment_from_dict(config.to_dict())
  tok = Tokenizer(exp.data.tokenizer)
  fns = train_lib.step_fns(exp.model, objectives.build(exp.objective, tok.special,
                                                       exp.model.vocab_size), exp.optimizer, 10)
  state = jax.eval_shape(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 8))))
  b, t = exp.train.batch_size, exp.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
  lowered = jax.jit(functools.partial(train_lib.train_step, fns)).lower(state, batch)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (lowered_dot_flops(lowered.as_text()) / (b * t), cost["flops"] / (b * t),
          flops_per_token(exp.model, t, exp.objective.predictions(t)))


# XLA's cost analysis adds the elementwise work (norms, softmax, GELU, Adam, MLM target
# selection) to the matmuls: measured at these toy widths (d_model 32) 1.091 (clm),
# 1.098 (llama), 1.196 (mlm: its head runs on 15% of the positions, so matmuls are a
# smaller share); 1.015-1.03 at d_model 256 (benchmarks.run).
@pytest.mark.parametrize("name,arg,elementwise_bound", [("clm_tiny", None, 1.15),
                                                        ("clm_tiny", "llama", 1.15),
                                                        ("mlm_tiny", None, 1.25)])
def test_mfu_formula_matches_the_compiled_step(tmp_path, name, arg, elementwise_bound):
  dots, total, formula = step_costs(name, tmp_path, arg, model__num_kv_heads=1 if arg else 0)
  assert abs(dots / formula - 1) < 0.02, (dots, formula)
  assert 1.0 <= total / formula < elementwise_bound, (total, formula)


@pytest.mark.parametrize("arg,moe", [(None, {}), ("llama", {"model__moe__shared_experts": 1})])
def test_mfu_formula_counts_a_mixture_of_experts_active_parameters(tmp_path, arg, moe):
  """moe_tiny (8 experts, top-2; the llama variant with a shared expert): the formula counts
  the router, the top-k experts and the shared ones, which is the matmul FLOPs of the traced
  step with dropless dispatch's grouped matmuls (`jax.lax.ragged_dot`) counted at the rows
  they multiply. (XLA:CPU's compiled ragged_dot computes every expert on every row, num_experts
  times that: the compiled program's count is the reference for dense models only.)"""
  config = tiny_config("moe_tiny", tmp_path, arg, model__scan_layers=False,
                       model__attention_impl="xla", model__moe__grouped_matmul="ragged_dot",
                       model__num_kv_heads=1 if arg else 0, **moe)
  exp = experiment_from_dict(config.to_dict())
  tok = Tokenizer(exp.data.tokenizer)
  fns = train_lib.step_fns(exp.model, objectives.build(exp.objective, tok.special,
                                                       exp.model.vocab_size), exp.optimizer, 10)
  state = jax.eval_shape(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 8))))
  b, t = exp.train.batch_size, exp.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
  traced = jax.make_jaxpr(functools.partial(train_lib.train_step, fns))(state, batch)
  formula = flops_per_token(exp.model, t, exp.objective.predictions(t))
  assert abs(traced_dot_flops(traced) / (b * t) / formula - 1) < 0.02
  dense = flops_per_token(exp.model.replace(moe=exp.model.moe.replace(num_experts=0),
                                            d_ff=exp.model.expert_d_ff), t,
                          exp.objective.predictions(t))
  assert formula < dense * 2  # top-2 (+ shared) experts of 8, not all 8
