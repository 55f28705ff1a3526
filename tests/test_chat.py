"""Chat data: templates rendered as transformers renders them, the ids its
apply_chat_template gives, assistant-only masks, packing, truncation and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import CHATML, CHATML_MARKED, make_chat_tokenizer
from lmjax import objectives
from lmjax.data import BUNDLED_DIR, Tokenizer, chat
from lmjax.data.examples import TaskConfig
from lmjax.errors import UserError

TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")
CONVERSATIONS = [
    [{"role": "user", "content": "Who is there?"},
     {"role": "assistant", "content": "Nay, answer me. Stand and unfold yourself."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Long live the king!"},
     {"role": "assistant", "content": "Bernardo?"},
     {"role": "user", "content": "He."},
     {"role": "assistant", "content": "You come most carefully upon your hour."}],
]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
  folder = tmp_path_factory.mktemp("chatml")
  return {marked: make_chat_tokenizer(str(folder / str(marked)),
                                      CHATML_MARKED if marked else CHATML)
          for marked in (True, False)}


@pytest.mark.parametrize("marked", [True, False])
def test_ids_and_masks_equal_transformers(chatml, marked):
  import transformers
  from lmjax.data.hf_tokenizer import HFTokenizer
  folder = chatml[marked]
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = HFTokenizer(folder)
  template = chat.load_template(tok)
  for messages in CONVERSATIONS:
    for prompt in (False, True):
      assert template.render(messages, prompt) == hf.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=prompt)
    conv = chat.Conversation("x:1", tuple(messages))
    ids, mask = chat.encode(conv, tok, template)
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=marked)
    assert ids == list(want["input_ids"])
    text = hf.decode([i for i, m in zip(ids, mask) if m])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if marked:  # the template's {% generation %} decides
      assert mask.astype(int).tolist() == list(want["assistant_masks"])
      assert text == "".join(r + "<|im_end|>" for r in replies)
    else:  # what each assistant turn adds after the generation prompt
      assert text == "".join(r + "<|im_end|>\n" for r in replies)


def test_lmjax_default_template_masks_content_and_end_of_turn():
  tok = Tokenizer(TOKENIZER)
  template = chat.load_template(tok)
  conv = chat.Conversation("x:1", tuple(CONVERSATIONS[1]))
  ids, mask = chat.encode(conv, tok, template)
  assert ids[0] == tok.special.bos and ids.count(tok.special.eos) == 2  # one per reply
  cuts = np.flatnonzero(np.diff(mask.astype(int))) + 1  # runs of equal mask values
  learned = [run for run, m in zip(np.split(np.asarray(ids), cuts), np.split(mask, cuts)) if m[0]]
  assert [tok.decode(run) for run in learned] == ["Bernardo?",
                                                  "You come most carefully upon your hour."]
  assert [run[-1] for run in learned] == [tok.special.eos] * 2  # the end-of-turn marker
  assert template.end_of_turn(tok) == tok.special.eos
  prompt = template.render(CONVERSATIONS[0][:1], add_generation_prompt=True)
  assert prompt.endswith("<|assistant|>\n")


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_truncation_and_packing(tmp_path):
  tok = Tokenizer(TOKENIZER)
  template = chat.load_template(tok)
  long = [m for _ in range(6) for m in CONVERSATIONS[1][1:]]  # 12 turns
  path = _write(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": long},
                                       {"prompt": "To be, or not to be:", "completion": " that."}])
  whole = len(chat.encode(chat.Conversation("x", tuple(long)), tok, template)[0])
  seq_len = whole // 2
  with pytest.raises(UserError, match=rf"c.jsonl:2: {whole} tokens, longer than data.seq_len="):
    chat.pack_conversations(path, tok, template, seq_len, "off")
  dropped = chat.pack_conversations(path, tok, template, seq_len, "drop")
  assert (dropped.conversations, dropped.dropped, dropped.cut) == (3, 1, 0)
  newest = chat.pack_conversations(path, tok, template, seq_len, "newest")
  assert (newest.dropped, newest.cut) == (0, 1)
  rows = newest.arrays
  assert rows["tokens"].shape[1] == seq_len and rows["segment_ids"].max() >= 2  # packed
  texts = [tok.decode(row[seg == s]) for row, seg in zip(rows["tokens"], rows["segment_ids"])
           for s in range(1, seg.max() + 1)]
  assert len(texts) == 3  # every conversation kept, the long one cut
  cut = [t for t in texts if t.count("<|user|>") > 2]
  assert len(cut) == 1 and cut[0].endswith("You come most carefully upon your hour.")
  completion = rows["loss_mask"][rows["segment_ids"] > 0]
  assert 0 < newest.loss_share < newest.real_share <= 1 and completion.any()
  unpacked = chat.pack_conversations(path, tok, template, seq_len, "newest", per_row=1)
  assert unpacked.arrays["segment_ids"].max() == 1
  assert unpacked.arrays["tokens"].shape[0] > rows["tokens"].shape[0]


def test_packed_equals_unpacked():
  """The SFT loss sums of conversations packed into one row equal those of each alone."""
  from lmjax.data.tokenizer import SpecialTokens
  from lmjax.model import TransformerConfig
  rng = np.random.default_rng(0)
  seqs = []
  for n in (9, 14, 7):
    mask = np.zeros(n, bool)
    mask[n // 2:] = True
    seqs.append((list(rng.integers(7, 60, n)), mask))
  cfg = TransformerConfig(vocab_size=64, max_len=32, d_model=16, num_layers=2, num_heads=2,
                          d_ff=32)
  sft = objectives.build(objectives.SFTConfig(),
                         SpecialTokens(0, 1, 2, 3, 4, 5, 6), 64, TaskConfig())
  model = sft.build_model(cfg, True)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]

  @jax.jit  # one compilation per shape, not one per operation
  def loss_sums(batch):
    return sft.loss_sums(model, params, sft.prepare(batch, jax.random.PRNGKey(0)), {})

  def sums(arrays):
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    batch["weights"] = jnp.ones(len(arrays["tokens"]), jnp.float32)
    return loss_sums(batch)

  packed, alone = sums(chat.pack(seqs, 32, 0)), sums(chat.pack(seqs, 32, 0, per_row=1))
  assert chat.pack(seqs, 32, 0)["tokens"].shape[0] == 1
  assert float(packed["weight"]) == sum(int(m[1:].sum()) for _, m in seqs)
  for key in ("loss", "correct", "weight"):
    np.testing.assert_allclose(packed[key], alone[key], rtol=1e-5)


BAD = [
    ({"messages": [{"role": "user"}]}, "message 1 needs a 'role' and a 'content'"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "message 1 has role 'narrator'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "message 2 is an empty assistant turn"),
    ({"text": "x"}, "expected 'messages', or 'prompt' and 'completion'"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m for _, m in BAD])
def test_bad_conversations_name_the_line(tmp_path, record, message):
  path = _write(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, record])
  with pytest.raises(UserError) as err:
    chat.read_conversations(path)
  assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_a_template_that_fails_to_render(tmp_path):
  tok = Tokenizer(TOKENIZER)
  bad = tmp_path / "t.jinja"
  bad.write_text("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}"
                 "{% endif %}")
  template = chat.load_template(tok, str(bad))
  path = _write(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
  with pytest.raises(UserError, match=r"c.jsonl:1: chat template .*t.jinja failed to render "
                                      r"\(TemplateError: system first\)"):
    chat.pack_conversations(path, tok, template, 64, "drop")
  bad.write_text("{% for %}")
  with pytest.raises(UserError, match="does not compile"):
    chat.load_template(tok, str(bad))


def test_train_tokenizer_reserves_the_role_markers(tmp_path):
  import subprocess
  import sys
  from tiny import ROOT
  proc = subprocess.run([sys.executable, "-m", "launch.train_tokenizer",
                         f"--input={os.path.join(BUNDLED_DIR, 'valid.txt')}",
                         f"--output={tmp_path / 'chat.model'}", "--vocab_size=400",
                         "--chat_markers"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  tok = Tokenizer(str(tmp_path / "chat.model"))
  conv = chat.Conversation("x", tuple(CONVERSATIONS[0]))
  ids, _ = chat.encode(conv, tok, chat.load_template(tok))
  pieces = [tok.id_to_piece(i) for i in ids]
  assert "<|user|>" in pieces and "<|assistant|>" in pieces  # each marker one piece
  plain = Tokenizer(TOKENIZER)
  plain_ids, _ = chat.encode(conv, plain, chat.load_template(plain))
  assert "<|user|>" not in [plain.id_to_piece(i) for i in plain_ids]


def test_preferences_with_an_implicit_prompt_equal_the_explicit_form(tmp_path):
  tok = Tokenizer(TOKENIZER)
  template = chat.load_template(tok)
  user = {"role": "user", "content": "Stand, ho! Who is there?"}
  good = {"role": "assistant", "content": "Friends to this ground."}
  bad = {"role": "assistant", "content": "Liegemen to the Dane."}
  path = _write(tmp_path / "p.jsonl", [
      {"prompt": [user], "chosen": [good], "rejected": [bad]},
      {"chosen": [user, good], "rejected": [user, bad]},  # TRL's implicit prompt
      {"prompt": "Who is there?", "chosen": " Friends.", "rejected": " Liegemen."}])
  explicit, implicit, text = chat.read_preferences(path)
  assert implicit.prompt == explicit.prompt == (user,) and implicit.chosen == (good,)
  assert chat.encode_preference(implicit, tok, template)[0][0] == \
      chat.encode_preference(explicit, tok, template)[0][0]
  (ids, mask), _ = chat.encode_preference(text, tok, template)
  assert ids[0] == tok.special.bos and ids[-1] == tok.special.eos  # eos ends a text completion
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Friends."
  rows = chat.preference_rows(path, tok, template, 64, "drop").arrays
  assert rows["chosen_tokens"].shape == rows["rejected_tokens"].shape == (3, 64)
