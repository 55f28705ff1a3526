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


# Today's families, tiny: every option lmjax reads is set off its default where the family
# has it. Sliding windows (64) and Llama 3's / YaRN's original contexts (64, 128) are
# shorter than the 300-token rows the tests run; soft-caps are small enough to bite.
WINDOW = 64
_ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                "rope_theta": 500.0}
_ROPE_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
              "rope_theta": 10000.0, "beta_fast": 16.0}
FAMILIES = {  # name: (config class, model class, options)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=_ROPE_LLAMA3)),
    "llama_linear_legacy": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, rope_parameters=_ROPE_YARN)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"], final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
    # Mixtures of experts: 4 experts, top-2; Qwen3-MoE with experts of their own width and a
    # dense layer between sparse ones.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        norm_topk_prob=True, mlp_only_layers=[1], use_sliding_window=True,
        sliding_window=WINDOW)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, pad_token_id=0)),
}


def make_family_model(name: str, directory: str, seed: int = 0, **overrides):
  """Writes a random model of family `name` (FAMILIES) with a tokenizer to `directory`, its
  norms and biases moved off their initial values, in float32; returns the torch model as
  transformers reads the directory back (eager attention, as Gemma 2 requires)."""
  import json

  import torch
  import transformers as T
  config_class, model_class, options = FAMILIES[name]
  torch.manual_seed(seed)
  os.makedirs(directory, exist_ok=True)
  _tokenizer("llama", directory)
  cfg = getattr(T, config_class)(**{
      **dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2), **options, **overrides})
  model = getattr(T, model_class)(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(directory)
  if name.endswith("_legacy"):  # the spelling of checkpoints saved before transformers 5
    path = os.path.join(directory, "config.json")
    with open(path) as f:
      config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    with open(path, "w") as f:
      json.dump(config, f)
  return load_causal_lm(directory)


def load_causal_lm(directory: str, loading_info: bool = False):
  """transformers' model of a directory in float32, eager attention, for reference."""
  import transformers as T
  out = T.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                               dtype="float32",
                                               output_loading_info=loading_info)
  model = out[0] if loading_info else out
  model.eval()
  return out
