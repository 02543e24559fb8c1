"""Instruction-tuned Llama finetuned on Verilog, with replay (digest §3 D; the paper's largest experiment).

Llama-3.2-1B-Instruct finetuned on PyraNet-Verilog as chat ("Write the following Verilog program.
{description}" → code), loss on assistant tokens only; seq 512, batch 128, LR 1e-5 (10M-token warmup,
then constant), AdamW β₂ 0.997, wd 0.02, 5 epochs. Replay batch 32: real text (DCLM from dolmino-mix-1124)
or self-generated samples from the frozen instruct model, prompted with BOS alone, temperature 1, all 512
tokens, no EOS stop (buffer 32). Arms: no replay, and {KL, NTP} × {real, self} × coefficient {1, 3, 10}
(the paper's plot shows coefficient 1). Evaluations: Verilog next-token accuracy on held-out assistant
tokens, and chat-formatted MCQ accuracy on MMLU (2,048), ARC-Challenge (1,024), CommonsenseQA (1,024).

Paper scale reads local files (run from the directory that holds them; `jaxreplay.data.instruct_sources` builds
the data from the Hugging Face datasets where the hub can be reached): the checkpoint in
models/Llama-3.2-1B-Instruct (config.json, model.safetensors, tokenizer files), data/pyranet/{train,valid}.jsonl,
data/dclm.jsonl, data/mcq/{mmlu,arc_challenge,commonsense_qa}.jsonl. `:small` builds a tiny random Llama-3
checkpoint with toy data under runs/instruct_small_assets and trains each arm for a few steps on a CPU.

  jaxreplay sweep sweeps/instruct.py[:small] --workdir=runs/instruct     # every arm (--dry-run lists them)
  jaxreplay report runs/instruct --out=report/instruct                   # results.csv / results.md
  jaxreplay instruct --config=sweeps/instruct.py:small --workdir=runs/one   # one run (KL, self)

`jaxreplay instruct` is `jaxreplay finetune` with this file as the default --config: the one trainer
(jaxreplay/train/loop.py) on chat data (data.kind='chat'), with the MCQ evaluator and BOS-prompted replay.

Data and model paths are read relative to the directory the sweep runs from (every worker's too).
"""

from jaxreplay import config as config_lib
from jaxreplay.experiments import sweeps

MODEL = "models/Llama-3.2-1B-Instruct"  # a local copy of meta-llama/Llama-3.2-1B-Instruct
MCQ = "mmlu:data/mcq/mmlu.jsonl,arc:data/mcq/arc_challenge.jsonl,csqa:data/mcq/commonsense_qa.jsonl"
SMALL_ASSETS = "runs/instruct_small_assets"

ARMS = [{"replay.method": "none"}] + sweeps.product(
    {"replay.method": ["ntp", "kl"]}, {"replay.source": ["real", "self"]}, {"replay.coeff": [1.0, 3.0, 10.0]})


VARIANTS = {"": "Llama-3.2-1B-Instruct on PyraNet-Verilog (local model and data files)", "paper": "the same as no argument",
            "small": "a tiny random Llama-3 checkpoint with toy chat data, a few steps per arm"}


def _small(arg: str) -> bool:
  if arg not in ("", "paper", "small"):
    raise ValueError(f"unknown variant {arg!r}: use no argument (the paper's setup) or 'small'")
  return arg == "small"


def get_config(arg: str = ""):
  c = config_lib.default()
  c.stage = "finetune"
  c.model.update(path=MODEL, seq_len=512, remat=True)
  c.train.microbatches = 4  # 40 rows (32 chat + 8 replay) per forward pass: ~10 GB of fp32 logits at V=128,256
  c.data.update(kind="chat", train="data/pyranet/train.jsonl", valid="data/pyranet/valid.jsonl",
                prompt_key="description", response_key="code",
                prompt_template="Write the following Verilog program. {prompt}")
  c.optim.update(lr=1e-5, warmup_tokens=10_000_000, schedule="constant", b1=0.9, b2=0.997, weight_decay=0.02,
                 batch_size=128)
  c.stop.update(epochs=5.0)
  c.eval.update(every_steps=1000, batch_size=64, valid_rows=2048, replay_rows=256, mcq=MCQ)
  # buffer: replay batches sampled per refill (32 rows each, as the paper's buffer of 32 samples)
  c.replay.update(method="kl", source="self", coeff=1.0, batch_size=32, buffer=1, temperature=1.0,
                  path="data/dclm.jsonl", max_tokens=200_000_000)
  c.checkpoint.update(every_steps=500, every_minutes=30.0)
  c.export.hf = True
  if _small(arg):
    import _tiny_llama  # next to this file
    paths = _tiny_llama.ensure(SMALL_ASSETS)
    c.model.update(path=paths["model"], seq_len=96, remat=False)
    c.train.microbatches = 1
    c.data.update(train=paths["chat"], valid="", valid_fraction=0.25, prompt_key="prompt", response_key="response")
    c.optim.update(lr=1e-3, warmup_tokens=256, batch_size=4)
    c.stop.update(epochs=0.0, steps=8)
    c.eval.update(every_steps=4, batch_size=4, valid_rows=0, replay_rows=4, mcq=f"toy:{paths['bench']}")
    c.replay.update(batch_size=2, buffer=2, path=paths["text"], max_tokens=0)
    c.checkpoint.update(every_steps=4, every_minutes=0.0, async_save=False)
    c.log.update(every_steps=2, progress=False)
    c.export.hf = False
  return c


def get_sweep(arg: str = ""):
  s = sweeps.Sweep(__doc__)
  s.stage("instruct", get_config(arg), ARMS)
  return s
