"""Shared command-line plumbing: flag parsing and user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from mla_jax.errors import UserError


def one_line(error: BaseException) -> str:
  """The error's message on one line; an embedded traceback is reduced to its final line."""
  text = str(error)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  text = text.replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") or "Traceback (most recent" in line for line in lines):
    head = lines[0].split("Traceback")[0].rstrip(": ")
    lines = [head + ":", lines[-1]] if head else [lines[-1]]
  return " ".join(" ".join(lines).split()) or type(error).__name__


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Optional[list[str]] = None) -> None:
  """Parses absl flags (including --config files and --config.x.y overrides) or exits with one line."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  try:
    flags.FLAGS(argv if argv is not None else sys.argv)
    flags.FLAGS.validate_all_flags()
  except Exception as e:  # config files and overrides raise many exception types
    fail(one_line(e))
  for name in flags.FLAGS:  # a config file that failed to load is only reported when first read
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      path = getattr(flags.FLAGS[name], "config_filename", "")
      fail(f"flag --{name}: cannot load config file {path!r} (missing or unreadable)")
  logging.set_verbosity(logging.WARNING)
  logging.use_python_logging(quiet=True)


def run(fn: Callable[[], object]) -> None:
  """Runs `fn`; a UserError (bad config, data, checkpoint or flag) prints one line and exits 2."""
  try:
    fn()
  except UserError as e:
    fail(one_line(e))
  except KeyboardInterrupt:
    fail("interrupted")
