"""User-facing errors: each one is printed as a single line by the command-line entry points."""


class UserError(Exception):
  """An error caused by the user's input (config, data, checkpoint, flags), not by a bug."""


class ConfigError(UserError, ValueError):
  """A config key breaks a rule. The message starts with the key's dotted name."""

  def __init__(self, key: str, rule: str):
    self.key = key
    self.rule = rule
    super().__init__(f"config error: {key}: {rule}")


class DataError(UserError, ValueError):
  """A data file is missing, empty, too small or malformed. The message names the file."""


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, corrupt or does not match the config. The message names it."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written, or lacks the space for a checkpoint. The message names it."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. too many consecutive non-finite updates). The message names the step."""
