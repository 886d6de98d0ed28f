"""User-facing errors: each one is printed as a single line by the command-line entry points.

Every type here can be built from one message (libraries re-raise errors as `type(e)(message)`).
"""

from __future__ import annotations

import re

_CONFIG_ERROR_LINE = re.compile(r"config error: ([\w.\[\]-]+): (.+)")


class UserError(Exception):
  """An error caused by the user's input (config, data, checkpoint, flags), not by a bug."""


class ConfigError(UserError, ValueError):
  """A config key breaks a rule. The message starts with the key's dotted name.

  `ConfigError(key, rule)`; `ConfigError(message)` also works, because libraries re-raise an error as
  `type(e)(text)` (ml_collections does, with the traceback as text): the key and rule are then read back
  from the text's last `config error: KEY: RULE` line, or are None with the text as the message.
  """

  def __init__(self, key: str, rule: str | None = None):
    if rule is None:
      key, rule, message = _parse_config_error(key)
    else:
      message = f"config error: {key}: {rule}"
    self.key = key
    self.rule = rule
    super().__init__(message)


class DataError(UserError, ValueError):
  """A data file is missing, empty, too small or malformed. The message names the file."""


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, corrupt or does not match the config. The message names it."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written, or lacks the space for a checkpoint. The message names it."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. too many consecutive non-finite updates). The message names the step."""


def _parse_config_error(text: str) -> tuple[str | None, str | None, str]:
  """(key, rule, message) from a message that may carry a traceback ending in a ConfigError line."""
  for line in reversed(str(text).splitlines()):
    match = _CONFIG_ERROR_LINE.search(line)
    if match:
      return match.group(1), match.group(2), f"config error: {match.group(1)}: {match.group(2)}"
  return None, None, str(text)
