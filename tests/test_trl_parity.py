"""SFT and DPO checked number for number against TRL (PyTorch), on the weights lmjax
exports (launch.convert's export_hf) and on the same examples, within 1e-4."""

import json

import jax
import numpy as np
import pytest
import torch

from hf_models import make_chat_model
from lmjax import objectives, pretrained
from lmjax.convert import export_hf
from lmjax.data.examples import TaskConfig
from lmjax.data.pipeline import DataConfig
from lmjax.objectives import DPOConfig, SFTConfig

CONVERSATIONS = [
    [{"role": "user", "content": "Who is there?"},
     {"role": "assistant", "content": "Nay, answer me."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Long live the king!"},
     {"role": "assistant", "content": "Bernardo?"}, {"role": "user", "content": "He."},
     {"role": "assistant", "content": "You come most carefully upon your hour."}],
    [{"role": "user", "content": "'Tis now struck twelve."},
     {"role": "assistant", "content": "Get thee to bed, Francisco."}],
]
PAIRS = [
    {"prompt": [{"role": "user", "content": "Who speaks first?"}],
     "chosen": [{"role": "assistant", "content": "BERNARDO speaks first."}],
     "rejected": [{"role": "assistant", "content": "FRANCISCO speaks first."}]},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "And who answers him?"}],
     "chosen": [{"role": "assistant", "content": "Francisco."}],
     "rejected": [{"role": "assistant", "content": "Nobody answers at all."}]},
    {"prompt": [{"role": "user", "content": "Stand, ho!"}],
     "chosen": [{"role": "assistant", "content": "Friends to this ground."}],
     "rejected": [{"role": "assistant", "content": "Liegemen to the Dane."}]},
]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _objective(kind, source, path, cfg=None):
  cfg = cfg or SFTConfig(pack=False)
  task = TaskConfig(train_file=path, eval_file=path)
  objective = objectives.build(cfg, source.tokenizer.special, source.model.vocab_size, task)
  train, _ = objective.datasets(DataConfig(seq_len=128), source.tokenizer, source.model, 0)
  return objective, train, objective.build_model(source.model, True)


def _trainer_args(cls, tmp_path, **kwargs):
  return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
             fp16=False, per_device_train_batch_size=8, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random GPT-2 with a ChatML tokenizer ({% generation %} marked), exported by lmjax."""
  tmp = tmp_path_factory.mktemp("trl")
  make_chat_model(str(tmp / "hf"))
  source = pretrained.load(str(tmp / "hf"))
  export_hf(source, str(tmp / "ref"))
  return tmp


def test_sft_loss_equals_trl(reference, tmp_path):
  import datasets
  import transformers
  from trl import SFTConfig, SFTTrainer
  folder = str(reference / "ref")
  source = pretrained.load(folder)
  cases = [({"messages": c} for c in CONVERSATIONS), dict(assistant_only_loss=True)], [
      ({"prompt": c[-2]["content"], "completion": " " + c[-1]["content"]} for c in CONVERSATIONS),
      dict(completion_only_loss=True)]
  for records, options in cases:
    records = list(records)
    path = _write(tmp_path / "sft.jsonl", records)
    objective, data, model = _objective("sft", source, path)
    batch = objective.prepare(jax.tree.map(np.asarray, data.eval_batch(0, len(records))),
                              jax.random.PRNGKey(0))
    sums = objective.loss_sums(model, source.params, batch, {})
    ours = float(sums["loss"] / sums["weight"])

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    trainer = SFTTrainer(model=hf, processing_class=tok,
                         args=_trainer_args(SFTConfig, tmp_path, packing=False, **options),
                         train_dataset=datasets.Dataset.from_list(records))
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_ids = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"],
                                                         inputs["attention_mask"])]
    ids = [row[seg > 0].tolist() for row, seg in zip(data.arrays["tokens"],
                                                     data.arrays["segment_ids"])]
    assert sorted(ids) == sorted(trl_ids)  # the same tokens (TRL's loader shuffles)
    with torch.no_grad():
      theirs = float(trainer.compute_loss(trainer.model, inputs))
    assert ours == pytest.approx(theirs, abs=1e-4), options


def test_dpo_losses_and_rewards_equal_trl(reference, tmp_path):
  import datasets
  import transformers
  import dataclasses
  from trl import DPOConfig as TRLConfig
  from trl import DPOTrainer
  ref_dir = str(reference / "ref")
  # The policy: the reference's weights moved at random (the comparison needs a policy away
  # from its reference, not a trained one), exported as launch.convert exports it.
  ref = pretrained.load(ref_dir)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(ref.params))))
  moved = jax.tree.map(lambda x: np.asarray(x + 0.03 * jax.random.normal(next(keys), x.shape,
                                                                         x.dtype)), ref.params)
  export_hf(dataclasses.replace(ref, params=moved), str(tmp_path / "policy"))
  policy = pretrained.load(str(tmp_path / "policy"))
  assert not jax.tree.all(jax.tree.map(np.array_equal, policy.params, ref.params))

  path = _write(tmp_path / "pairs.jsonl", PAIRS)
  ours = {}
  for eps in (0.0, 0.1):  # TRL's sigmoid loss; the conservative variant (cDPO), which TRL 1.x
    # no longer computes under "sigmoid": checked against its formula on TRL's margins
    objective, data, model = _objective("dpo", ref, path, DPOConfig(kind="dpo", beta=0.2,
                                                                   label_smoothing=eps))
    objective.precompute((data,), model, ref.params)
    ours[eps] = [{k: float(v) for k, v in objective.loss_sums(
        model, policy.params, jax.tree.map(np.asarray, data.eval_batch(i, 1)), {}).items()}
        for i in range(len(PAIRS))]

  trainer = DPOTrainer(
      model=transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy")),
      ref_model=transformers.AutoModelForCausalLM.from_pretrained(ref_dir),
      processing_class=transformers.AutoTokenizer.from_pretrained(ref_dir),
      args=_trainer_args(TRLConfig, tmp_path, beta=0.2, loss_type=["sigmoid"], max_length=None),
      train_dataset=datasets.Dataset.from_list(PAIRS))
  for i, (got, smoothed) in enumerate(zip(ours[0.0], ours[0.1])):
    example = trainer.train_dataset[i]
    row = data.arrays["chosen_tokens"][i][data.arrays["chosen_segment_ids"][i] > 0].tolist()
    assert row == example["prompt_ids"] + example["chosen_ids"]  # TRL's tokens
    with torch.no_grad():
      loss = float(trainer.compute_loss(trainer.model, trainer.data_collator([example])))
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["reward_chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-4)
    assert got["reward_rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-4)
    assert got["margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-4)
    m = torch.tensor(metrics["rewards/margins"], dtype=torch.float64)
    conservative = -0.9 * torch.nn.functional.logsigmoid(m) - 0.1 * torch.nn.functional.logsigmoid(-m)
    assert smoothed["loss"] == pytest.approx(float(conservative), abs=1e-4)
    assert smoothed["margin"] == got["margin"]
