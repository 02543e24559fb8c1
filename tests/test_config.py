import pytest

from jaxreplay.errors import ConfigError
from jaxreplay import config as config_lib


def valid():
  c = config_lib.default()
  c.stop.tokens = 1000
  return c


@pytest.mark.parametrize("key,value,match", [
    ("model.d_model", 0, "config.model.d_model=0 is invalid"),
    ("model.d_model", 100, "not divisible by config.model.head_dim"),
    ("optim.batch_size", -4, "config.optim.batch_size=-4"),
    ("optim.b2", 1.0, r"config.optim.b2=1.0 must lie in \[0, 1\)"),
    ("optim.schedule", "linear", "config.optim.schedule='linear'"),
    ("replay.method", "ewc", "config.replay.method='ewc'"),
    ("data.dataset_id", 12, "outside the tokenizer's reserved ids"),
    ("replay.top_p", 0.0, "config.replay.top_p"),
    ("mesh.tensor", 3, "does not divide the 4 heads"),
    ("data.mix_fraction", 0.5, "needs config.data.mix_path"),
])
def test_bad_values_name_key_and_fix(key, value, match):
  c = valid()
  node, leaf = key.split(".")
  c[node][leaf] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_odd_head_dim():
  c = valid()
  c.model.update(d_model=240, head_dim=15)
  with pytest.raises(ConfigError, match="must be even"):
    config_lib.validate(c)


def test_two_length_criteria_and_none():
  c = valid()
  c.stop.epochs = 2.0
  with pytest.raises(ConfigError, match="Two training-length criteria.*config.stop.tokens, config.stop.epochs"):
    config_lib.validate(c)
  c = config_lib.default()
  with pytest.raises(ConfigError, match="No stopping criterion"):
    config_lib.validate(c)
  c.stop.update(epochs=10.0, target_loss=2.9)  # a length plus a target is how the paper finetunes
  config_lib.validate(c)


def test_replay_needs_a_pretrained_run():
  c = valid()
  c.replay.method = "kl"
  with pytest.raises(ConfigError, match="config.init.from"):
    config_lib.validate(c)
  c.init["from"] = "/some/run"
  config_lib.validate(c)
  c.replay.update(method="replace", coeff=1.5)
  with pytest.raises(ConfigError, match="fraction of rows replaced"):
    config_lib.validate(c)


def test_unknown_key_is_rejected_in_every_group():
  """default() is locked at every level: a typo in any group is an error that names the near key, and never
  silently creates a setting (the CLI turns the error into one sentence; tests/test_cli_errors.py)."""
  c = valid()
  before = c.to_dict()
  with pytest.raises(AttributeError, match='Did you mean "d_model"'):
    c.model.d_modle = 3
  groups = [k for k, v in c.items() if hasattr(v, "keys")]
  assert {"model", "data", "optim", "stop", "eval", "replay", "lora", "mesh", "init"} <= set(groups)
  for group in groups:
    with pytest.raises(AttributeError):
      setattr(c[group], "no_such_setting", 1)
  with pytest.raises(AttributeError):
    c.no_such_group = {}
  assert c.to_dict() == before


def test_differences_and_json_round_trip(tmp_path):
  a = valid()
  config_lib.write(a, str(tmp_path))
  b = config_lib.from_json_file(str(tmp_path / "config.json"))
  assert config_lib.differences(a, b) == []
  b.optim.lr = 0.5
  b.log.every_steps = 7  # logging does not change the numbers
  b.mesh.fsdp = 4  # a run may resume on another device layout
  assert config_lib.differences(a, b) == ["optim.lr"]
  old = a.to_dict()
  del old["replay"]["prompt_ids"]  # a workdir written before a key existed still matches its default
  del old["replay"]["teacher"]
  assert config_lib.differences(config_lib.ml_collections.ConfigDict(old), a) == []
  # A config stored whole before a key existed (a sweep's runs in sweep.json) still validates and resolves.
  stored = a.to_dict()
  del stored["replay"]["teacher"]
  stored["init"]["from"] = "/some/run"
  stored["replay"].update(method="kl", source="self")
  stored = config_lib.validate(config_lib.ml_collections.ConfigDict(stored))
  assert config_lib.replay_teacher(stored, 16) == "sampled"  # 16 · 256 rows · 256 · 4096 · 4 B on 16 devices


def test_replay_teacher_is_validated_and_resolved():
  c = valid()
  c.init["from"] = "/some/run"
  c.replay.update(method="ntp", source="self", teacher="sampled")
  with pytest.raises(ConfigError, match="config.replay.teacher='sampled'.*method='ntp'.*set config.replay.teacher "
                                        "to 'auto' or 'forward'"):
    config_lib.validate(c)
  c.replay.update(method="kl", source="real")
  with pytest.raises(ConfigError, match="source='real'"):
    config_lib.validate(c)
  c.replay.teacher = "cached"
  with pytest.raises(ConfigError, match="config.replay.teacher='cached': use one of auto, forward, sampled"):
    config_lib.validate(c)
  c.replay.update(source="self", teacher="sampled")
  config_lib.validate(c)

  # auto: sampled for kl on self-generated rows while buffer × rows × T × V × 4 bytes per device ≤ 1 GiB.
  c.replay.update(teacher="auto", buffer=16, batch_size=64)
  c.model.update(seq_len=256, vocab_size=4096)  # 16·64·256·4096·4 = 4 GiB
  assert config_lib.replay_teacher(c) == "forward"
  assert config_lib.replay_teacher(c, 2) == "forward"
  assert config_lib.replay_teacher(c, 4) == "sampled"  # exactly 1 GiB each
  c.replay.batch_size = 0  # 0 = the downstream batch size (256 here)
  assert config_lib.replay_teacher(c, 4) == "forward" and config_lib.replay_teacher(c, 16) == "sampled"
  c.replay.teacher = "sampled"
  assert config_lib.replay_teacher(c) == "sampled"  # asked for: kept whatever it costs
  c.replay.teacher = "forward"
  assert config_lib.replay_teacher(c, 1024) == "forward"
  for method, source in (("ntp", "self"), ("kl", "real"), ("none", "self"), ("kl_downstream", "self")):
    c.replay.update(method=method, source=source, teacher="auto")
    assert config_lib.replay_teacher(c, 1024) == "forward"


def test_dtype_per_platform():
  c = valid()
  assert config_lib.compute_dtype_name(c, "cpu") == "float32"
  assert config_lib.compute_dtype_name(c, "gpu") == "bfloat16"
  c.model.compute_dtype = "float32"
  assert config_lib.compute_dtype_name(c, "tpu") == "float32"
