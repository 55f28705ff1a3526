"""Small random Hugging Face models (GPT-2, BERT, LLaMA) with real tokenizers, written to
local directories as `save_pretrained` does; nothing is downloaded."""

from __future__ import annotations

import os

from lmjax.data import BUNDLED_DIR

VOCAB = 300


def _lines(n=3000):
  with open(os.path.join(BUNDLED_DIR, "train.txt")) as f:
    return [line for _, line in zip(range(n), f) if line.strip()]


def _tokenizer(kind: str, directory: str) -> None:
  import tokenizers
  if kind == "bert":
    tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(_lines(), vocab_size=VOCAB,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save_model(directory)  # vocab.txt
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      f.write('{"do_lower_case": true}')
    return
  tok = tokenizers.ByteLevelBPETokenizer()
  specials = ["<|endoftext|>"] if kind == "gpt2" else ["<unk>", "<s>", "</s>"]
  tok.train_from_iterator(_lines(), vocab_size=VOCAB, special_tokens=specials)
  tok.save(os.path.join(directory, "tokenizer.json"))


def make_hf_model(kind: str, directory: str, seed: int = 0, **overrides):
  """Writes a random `kind` model and its tokenizer to `directory`; returns the torch model."""
  import torch
  import transformers as T
  torch.manual_seed(seed)
  os.makedirs(directory, exist_ok=True)
  _tokenizer(kind, directory)
  if kind == "gpt2":
    cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                       bos_token_id=0, eos_token_id=0, **overrides)
    model = T.GPT2LMHeadModel(cfg)
  elif kind == "bert":
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                       **overrides)
    model = T.BertForMaskedLM(cfg)
  else:
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                        rope_theta=500.0, **overrides)
    model = T.LlamaForCausalLM(cfg)
  with torch.no_grad():  # HF initialises norms to 1/0 and biases to 0: perturb them all
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.eval()
  model.save_pretrained(directory)
  return model


# ChatML as Qwen's and TRL's test models write it, plain and with {% generation %} markers
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_chat_tokenizer(directory: str, template: str = CHATML) -> str:
  """A byte-level BPE tokenizer with ChatML's markers and `template` as its chat template,
  saved as transformers saves one (tokenizer.json, tokenizer_config.json)."""
  import json
  import tokenizers
  os.makedirs(directory, exist_ok=True)
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(_lines(), vocab_size=VOCAB,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": template}, f)
  return directory


def make_chat_model(directory: str, template: str = CHATML_MARKED, seed: int = 0):
  """A random GPT-2 whose tokenizer has ChatML's markers and `template`; <|im_end|> is its
  eos. Returns the torch model."""
  import torch
  import transformers as T
  make_chat_tokenizer(directory, template)
  tok = T.AutoTokenizer.from_pretrained(directory)
  torch.manual_seed(seed)
  cfg = T.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                     eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                     pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
  model = T.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.eval()
  model.save_pretrained(directory)
  return model
