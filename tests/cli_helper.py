"""Runs many `python -m mla_jax.<entry point> ARGS` command lines for one interpreter start-up.

  python tests/cli_helper.py < cases.json > results.json

cases.json is a list of [module, [args...]]. The entry points are imported once (jax, flax and orbax take
seconds to import; no backend is started); then every command line runs at the same time in its own
forked child exactly as `python -m` runs a module (runpy with `__name__ == "__main__"` and sys.argv set),
with stdout and stderr captured. Prints a JSON list of {"rc", "stdout", "stderr"}, one per case.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_child(module: str, args: list[str], out_path: str, err_path: str) -> None:
  """In the forked child: runs the module as __main__ with stdout/stderr sent to files, then exits."""
  for fd, path in ((1, out_path), (2, err_path)):
    with open(path, "w") as f:
      os.dup2(f.fileno(), fd)
  sys.argv = [module, *args]
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main() -> None:
  cases = json.load(sys.stdin)
  for module in sorted({module for module, _ in cases}):
    importlib.import_module(module)  # everything it imports stays loaded for the children;
    del sys.modules[module]  # the module itself runs afresh in each, as `python -m` runs it
  tmp = tempfile.mkdtemp(prefix="cli_helper.")
  children = []
  for i, (module, args) in enumerate(cases):
    out_path, err_path = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
    pid = os.fork()
    if pid == 0:
      run_child(module, args, out_path, err_path)
    children.append((pid, out_path, err_path))
  results = []
  for pid, out_path, err_path in children:
    _, status = os.waitpid(pid, 0)
    with open(out_path) as out, open(err_path) as err:
      results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()})
    os.remove(out_path)
    os.remove(err_path)
  os.rmdir(tmp)
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
