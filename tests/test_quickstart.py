"""`jaxreplay quickstart` on a tiny experiment: --scale shrinks every stage, and a second call on a finished
quickstart trains nothing and prints the same table."""
import json
import os
import textwrap

from jaxreplay import quickstart

from helpers import token_dir


def test_quickstart_scales_its_stages_and_a_second_call_trains_nothing(tmp_path, capsys):
  a, b = token_dir(tmp_path / "a", dataset_id=0, seed=0, step=3), token_dir(tmp_path / "b", dataset_id=1, seed=1, step=5)
  exp = tmp_path / "exp.py"
  exp.write_text(textwrap.dedent(f"""
      from jaxreplay import config as config_lib
      def get_config(arg):
        c = config_lib.default()
        c.model.update(d_model=32, n_layers=2, head_dim=16, seq_len=16, vocab_size=64)
        c.optim.update(batch_size=8, lr=1e-2, warmup_tokens=256)
        c.eval.update(every_tokens=1280, tokens=1024, batch_size=8)
        c.checkpoint.update(every_steps=10, every_minutes=0.0, async_save=False)
        c.log.update(every_steps=5, progress=False)
        c.data.path = {a!r} if arg == "pretrain" else {b!r}
        c.stop.tokens = 40 * 128  # 40 steps of 8 x 16 tokens
        if arg != "pretrain":
          c.stage = "finetune"
        if arg == "finetune_kl":
          c.replay.update(method="kl", source="self", coeff=1.0, batch_size=8, buffer=2)
        return c
      """))
  workdir = str(tmp_path / "qs")
  argv = ["jaxreplay quickstart", f"--workdir={workdir}", f"--config={exp}", "--scale=0.5"]
  assert quickstart.main(argv) == 0
  first = capsys.readouterr().out
  runs = ("pretrain", "finetune_none", "finetune_kl_self")
  for name in runs:
    with open(os.path.join(workdir, name, "final.json")) as f:
      final = json.load(f)
    assert final["step"] == 20 and final["tokens"] == 20 * 128, name  # half of 40 steps
  with open(os.path.join(workdir, "quickstart.json")) as f:
    table = json.load(f)
  assert [r["run"] for r in table] == ["finetune_none", "finetune_kl_self"]
  mtimes = {n: os.path.getmtime(os.path.join(workdir, n, "final.json")) for n in runs}
  assert quickstart.main(argv) == 0  # finished: no run trains again, the same table is printed
  again = capsys.readouterr().out
  assert {n: os.path.getmtime(os.path.join(workdir, n, "final.json")) for n in runs} == mtimes
  table_lines = lambda out: [line for line in out.splitlines() if "finetune_" in line and "==" not in line]
  assert table_lines(again) == table_lines(first) and table_lines(first)
