"""Every error a user can cause and fix, in one place at the bottom of the import graph.

The rule for each: its message is one sentence that names the problem and the fix (the value, key, file or
line, and what to do instead). The command line prints that sentence and exits with status 2; nothing saved
is lost. Library code raises these and never prints or exits; `jaxreplay.cli` catches `UserError`.

Each class also derives from the builtin its callers have always caught (ValueError, RuntimeError).
"""


class UserError(Exception):
  """Base of every user error: one sentence naming the problem and the fix; the CLI exits 2."""


class ConfigError(UserError, ValueError):
  """A config value a user set is wrong; the message names the key and the fix."""


class DataError(UserError, ValueError):
  """Bad data or a bad data argument; the message names the file or value and the fix."""


class ChatDataError(UserError, ValueError):
  """Bad chat data or chat template; the message names the file or line and the fix."""


class MeshError(UserError, ValueError):
  """The requested device mesh does not fit the devices; the message says which axis and the fix."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or export cannot be used; the message says why and what to do."""


class HFImportError(UserError, ValueError):
  """A Hugging Face checkpoint that cannot be imported; the message names the file or value and the fix."""


class SamplingError(UserError, ValueError):
  """Sampling arguments that cannot work; the message names the value and the fix."""


class MCQError(UserError, ValueError):
  """A multiple-choice benchmark file that cannot be read; the message names the file, line and fix."""


class LMEvalError(ConfigError):
  """A checkpoint or task lm-eval cannot run; the message names it and the fix."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the message says what to change, checkpoints are kept."""


class SweepError(UserError, ValueError):
  """A sweep definition, sweep workdir or sweep flag is wrong; the message names the problem and the fix."""


class UsageError(UserError, ValueError):
  """A command-line flag or argument is missing or wrong; the message names the flag and the fix."""


class StorageError(UserError, OSError):
  """A path or bucket that cannot be used (missing, not writable, gcsfs absent, local mixed with remote)."""
