"""Shared command-line plumbing: flag parsing and user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import ast
import glob
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Callable

from absl import flags, logging

from mla_jax import config as config_lib
from mla_jax.errors import UserError

HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_python_format_warning = warnings.formatwarning


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


def parse_flags(argv: list[str] | None = None, doc: str | None = None) -> None:
  """Parses absl flags (including --config files and --config.x.y overrides) or exits with one line.

  --help (or -h) prints `doc` (default: the calling entry point's docstring), every flag with its help
  and, where a --config flag exists, the config files; then exits 0.
  """
  argv = argv if argv is not None else sys.argv
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if any(arg in HELP_FLAGS for arg in args):
    if doc is None:
      doc = sys._getframe(1).f_globals.get("__doc__")
    print(usage(flags.FLAGS, doc or ""))
    sys.exit(0)
  try:
    flags.FLAGS(argv)
    flags.FLAGS.validate_all_flags()
  except Exception as e:  # config files and overrides raise many exception types
    fail(_unknown_override(flags.FLAGS, args) or one_line(e))
  for name in flags.FLAGS:  # a config file that failed to load is only reported when first read
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      path = getattr(flags.FLAGS[name], "config_filename", "")
      fail(
        f"flag --{name}: cannot load config file {path!r} (missing or unreadable); config files: "
        + ", ".join(path for path, _, _ in config_files())
      )
  logging.set_verbosity(logging.WARNING)
  logging.use_python_logging(quiet=True)
  warnings.formatwarning = _format_warning


def _format_warning(message, category, filename, lineno, line=None) -> str:
  """Warnings raised by mla_jax print as one `warning: ...` line; others keep Python's format."""
  if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
    return f"warning: {message}\n"
  return _python_format_warning(message, category, filename, lineno, line)


def _is_config_flag(flag) -> bool:
  return flag.flag_type() == "config object"


def _unknown_override(flag_values, args: list[str]) -> str | None:
  """The ConfigError line for the first `--config.KEY=VALUE` whose KEY does not exist, if any."""
  for arg in args:
    name = arg.lstrip("-").split("=", 1)[0]
    base, _, key = name.partition(".")
    if arg.startswith("-") and key and base in flag_values and _is_config_flag(flag_values[base]):
      error = config_lib.unknown_key_error(key)
      if error:
        return str(error)
  return None


def usage(flag_values, doc: str) -> str:
  """The --help text: `doc`, the entry point's flags with their help (not those of absl, chex or orbax),
  and the config files."""
  lines = [doc.strip(), "", "Flags:"]
  wrap = lambda text: textwrap.wrap(text, 108, initial_indent="      ", subsequent_indent="      ")
  # absl files each flag under its module's name, or sys.argv[0] for the module that runs as the script
  ours = lambda module: module in ("__main__", sys.argv[0]) or module.split(".")[0] == "mla_jax"
  defined = [
    flag for module, module_flags in flag_values.flags_by_module_dict().items() if ours(module) for flag in module_flags
  ]
  has_config = False
  for flag in sorted({f.name: f for f in defined}.values(), key=lambda f: f.name):
    default = "" if flag.default in (None, "") else f" (default: {flag.default!r})"
    lines += [f"  --{flag.name}"] + wrap(f"{flag.help}{default}")
    if _is_config_flag(flag):
      has_config = True
      lines += [f"  --{flag.name}.SECTION.KEY=VALUE"] + wrap(
        "Overrides one key of the config file, e.g. --config.trainer.max_steps=100 or "
        "--config.model.kv_latent_dim=256 (every key and its meaning: the key tables in mla_jax/config.py)."
      )
  lines += ["  --help, -h"] + wrap("Shows this help and exits.")
  if has_config:
    files = config_files()
    lines += ["", "Config files (--config=FILE[:ARG]; FILE:quick is a short CPU run of the same model):"]
    names = [path + "".join(f"[:{arg}]" if arg == "quick" else f":{arg}" for arg in args) for path, args, _ in files]
    width = max(map(len, names), default=0)
    for name, (_, _, summary) in zip(names, files):
      lines += textwrap.wrap(summary, 108, initial_indent=f"  {name:<{width}}  ", subsequent_indent=" " * (width + 4))
    if not files:
      lines.append("  (none found: run from the repository root, where configs/ is)")
  return "\n".join(lines)


def config_files() -> list[tuple[str, list[str], str]]:
  """(path, the arguments its docstring shows, first docstring line) of each configs/*.py, from the working
  directory's configs/ folder or else the one beside the package. Files are parsed, not imported."""
  folder = "configs"
  if not os.path.isdir(folder):
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  files = []
  for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
    if os.path.basename(path).startswith("_"):
      continue
    try:
      with open(path) as f:
        docstring = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
      docstring = ""
    summary = docstring.strip().splitlines()[0] if docstring.strip() else ""
    path = os.path.relpath(path) if folder == "configs" else path
    args = re.findall(r"--config=\S*?" + re.escape(os.path.basename(path)) + r":(\S+)", docstring)
    files.append((path, list(dict.fromkeys(args)), summary))
  return files


def run(fn: Callable[[], object]) -> None:
  """Runs `fn`; a UserError (bad config, data, checkpoint or flag) prints one line and exits 2."""
  try:
    fn()
  except UserError as e:
    fail(one_line(e))
  except KeyboardInterrupt:
    fail("interrupted")
