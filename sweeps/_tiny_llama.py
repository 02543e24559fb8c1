"""A tiny random Llama-3-style instruct checkpoint and toy data, made locally (no downloads).

For the `:small` instruct sweep and the tests: a byte-level BPE tokenizer with Llama-3's special tokens and
chat template, a 2-layer grouped-query Llama with llama3 RoPE scaling and tied embeddings saved as
safetensors by `transformers`, a toy prompt/response file (Verilog-like), a replay text file and a toy
multiple-choice benchmark. Needs torch and transformers (the `hf` extra plus torch).
"""

from __future__ import annotations

import json
import os

import numpy as np

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|pad|>"]
# Llama-3's chat template (without the date header of 3.1+).
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
            "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
WORDS = "clk reset counter adder mux wire reg input output assign always posedge".split()
CORPUS = ["module counter(input clk, output reg [3:0] q); always @(posedge clk) q <= q + 1; endmodule",
          "Write the following Verilog program. A four bit counter with reset, adder and mux.",
          "The quick brown fox jumps over the lazy dog.", " ".join(WORDS), TEMPLATE,
          "Answer the following multiple choice question. The entire content of your response should be of the "
          "following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of A, B. ANSWER: A B C D",
          "user assistant system"] * 20


def make_tokenizer(directory: str, vocab_size: int = 500):
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                              eos_token="<|eot_id|>", pad_token="<|pad|>")
  fast.chat_template = TEMPLATE
  fast.save_pretrained(directory)
  return fast


def make_checkpoint(directory: str, seed: int = 0, std: float = 0.1, d_model: int = 64, n_layers: int = 2):
  """Tokenizer + random Llama in `directory`; returns the torch model (eval mode)."""
  import torch
  import transformers
  os.makedirs(directory, exist_ok=True)
  tok = make_tokenizer(directory)
  cfg = transformers.LlamaConfig(
      hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
      rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=32))
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.endswith("norm.weight"):
        p.normal_(0.0, std)
  model.eval().save_pretrained(directory, safe_serialization=True)
  return model


def write_data(directory: str, n_chat: int = 24, seed: int = 0) -> dict:
  """chat.jsonl (prompt/response), text.jsonl (replay text), bench.jsonl (MCQ); returns their paths."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("chat", "text", "bench")}
  with open(paths["chat"], "w") as f:
    for i in range(n_chat):
      desc = " ".join(rng.choice(WORDS, 4))
      f.write(json.dumps(dict(prompt=desc, response=f"module m{i}; {desc} endmodule")) + "\n")
  with open(paths["text"], "w") as f:
    for _ in range(30):
      f.write(json.dumps(dict(text="The quick brown fox jumps over the lazy dog. " * 3)) + "\n")
  with open(paths["bench"], "w") as f:
    f.write(json.dumps(dict(question="Which is Verilog?", choices=["module", "fox"], answer=0)) + "\n")
    f.write(json.dumps(dict(question="Which animal?", choices=["wire", "fox", "reg"], answer=1)) + "\n")
  return paths


def ensure(directory: str) -> dict:
  """Builds the checkpoint (DIR/model) and data (DIR/data) once; returns {model, chat, text, bench} paths."""
  model_dir, data_dir = os.path.join(directory, "model"), os.path.join(directory, "data")
  if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
    make_checkpoint(model_dir)
  paths = write_data(data_dir) if not os.path.exists(os.path.join(data_dir, "bench.jsonl")) else {
      k: os.path.join(data_dir, f"{k}.jsonl") for k in ("chat", "text", "bench")}
  return dict(model=model_dir, **paths)
