"""The `jaxvol` command: one program with a subcommand per job.

  jaxvol train|evaluate|sample|plan --config=NAME_OR_PATH[:VARIANT] --workdir=DIR \\
      [--config.KEY=VALUE ...]         (what `python -m jaxvol.main --mode=...` runs: jaxvol.main)
  jaxvol import --from sparse|prdit|prdit-fm CHECKPOINT --config=... --workdir=DIR
                                       (jaxvol.main --mode=import: jaxvol.train.importer)
  jaxvol predict ...                   (jaxvol.predict)
  jaxvol convert --datalist LIST --out STORE --preset MOD=KIND ...    (jaxvol.convert_cli)
  jaxvol prepare --task TASK --out DIR                                (jaxvol.prepare)

--config takes a packaged config's NAME (`ppdm_pet_denoise:smoke`, jaxvol.configs) or a config
file's path. Each subcommand's module is imported only when it runs, so `jaxvol --help` and the
error for a bad command or config name return at once, without starting JAX.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from typing import Callable, Sequence

from jaxvol import configs

# Subcommand -> one line for `jaxvol --help`. The first four run jaxvol.main with --mode=<name>.
ABSL_COMMANDS = {
    "train": "train a model from a config (--config, --workdir; resumes from the workdir)",
    "evaluate": "score a checkpoint (best on validation, else latest; --checkpoint=) on "
                "config.eval.split beside the floors and tuned classical references",
    "sample": "predictions only, or volumes generated from noise (unconditional configs)",
    "plan": "compile the train step and sampler for a mesh; print memory and FLOPs per device",
    "import": "an authors' released checkpoint as a run: import --from sparse|prdit|prdit-fm "
              "CHECKPOINT --config ... --workdir ... (jaxvol.train.importer)",
}
# Subcommand -> (module whose main(argv) -> int takes the remaining arguments, one line).
MODULE_COMMANDS = {
    "predict": ("jaxvol.predict", "apply a trained model to your own NIfTI files (no store)"),
    "convert": ("jaxvol.convert_cli", "convert a datalist of NIfTI volumes into a store"),
    "prepare": ("jaxvol.prepare", "build a task's paired data and store from the shared volumes"),
}
COMMANDS = (*ABSL_COMMANDS, *MODULE_COMMANDS)
_HELP = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?")
_ABSL_USAGE = "--config=NAME_OR_PATH[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...] [flags]"


def resolve_config(spec: str) -> str:
  """A --config value with a packaged config's NAME replaced by its file (jaxvol.configs)."""
  return configs.resolve(spec)


def usage() -> str:
  """The text of `jaxvol --help`."""
  width = max(map(len, COMMANDS))
  rows = [*ABSL_COMMANDS.items(), *((k, v[1]) for k, v in MODULE_COMMANDS.items())]
  return "\n".join([
      "usage: jaxvol COMMAND [ARGS...]",
      "",
      "Diffusion on whole 3D medical volumes in JAX.",
      "",
      "commands:",
      *(f"  {name:<{width}}  {line}" for name, line in rows),
      "",
      "`jaxvol COMMAND --help` describes a command; train/evaluate/sample/plan take",
      f"  {_ABSL_USAGE}",
      "with --config a packaged config's NAME (listed by `jaxvol train --help`) or a file.",
  ])


def absl_help(command: str) -> str:
  """The text of `jaxvol train --help` (and evaluate, sample, plan): jaxvol.main's flags and the
  packaged configs. Imports jaxvol.main, which defines the flags (and imports JAX)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from jaxvol import main as main_lib  # pylint: disable=import-outside-toplevel
  wrap = lambda text, indent: textwrap.fill(text, 100, initial_indent=indent,
                                            subsequent_indent=indent + "    ")
  lines = [f"usage: jaxvol {command} {_ABSL_USAGE}", "", ABSL_COMMANDS[command] + ".", "",
           "flags:"]
  described = {
      "config": "a packaged config's NAME (below) or a config file, then optionally :VARIANT "
                "(comma-separated tokens, in the config's docstring); --config.KEY=VALUE "
                "overrides one field, e.g. --config.data.store=STORE --config.train.steps=200.",
      "mode": None,  # the subcommand
  }
  for flag in sorted(flags.FLAGS.get_flags_for_module(main_lib.__name__), key=lambda f: f.name):
    text = described.get(flag.name, flag.help.removeprefix("--mode=plan: "))
    if text is None or (flag.name.startswith("plan_") and command != "plan") or (
        flag.name.startswith("import_") and command != "import"):
      continue
    default = "" if flag.default in (None, "") else f" (default: {flag.default})"
    lines.append(wrap(f"--{flag.name}: {text}{default}", "  "))
  lines += ["", "configs (NAME: the first paragraph of its docstring):"]
  lines += [wrap(f"{name}: {configs.summary(name)}", "  ") for name in configs.names()]
  lines += ["", "`jaxvol {} --helpfull` lists every absl flag.".format(command)]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `jaxvol ARGS...`; returns the exit status (2 for a usage error)."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not args:
    print(usage(), file=sys.stderr)
    return 2
  command, rest = args[0], args[1:]
  if command in _HELP or command == "help":
    if command == "help" and rest:
      return main([rest[0], "--help"])
    print(usage())
    return 0
  if command == "--version":
    from jaxvol import __version__  # pylint: disable=import-outside-toplevel
    print(f"jaxvol {__version__}")
    return 0
  if command in ABSL_COMMANDS:
    return _absl_command(command, rest)
  if command in MODULE_COMMANDS:
    module = importlib.import_module(MODULE_COMMANDS[command][0])
    return _call(f"jaxvol {command}", module.main, rest)
  close = difflib.get_close_matches(command, COMMANDS, n=1)
  hint = f"did you mean {close[0]}? " if close else ""
  print(f"jaxvol: unknown command {command!r}; {hint}(commands: {', '.join(COMMANDS)}; "
        "see jaxvol --help)", file=sys.stderr)
  return 2


def _absl_command(command: str, rest: list[str]) -> int:
  """`python -m jaxvol.main --mode=<command> ...`, in this process."""
  flags_given = rest[:rest.index("--")] if "--" in rest else rest
  if any(a in _HELP for a in flags_given):
    print(absl_help(command))
    return 0
  if any(a.split("=", 1)[0] in ("--mode", "-mode") for a in flags_given):
    print(f"jaxvol {command}: error: --mode is the subcommand; drop it", file=sys.stderr)
    return 2
  try:
    if command == "import":
      rest = import_argv(rest)
  except ValueError as e:
    print(f"jaxvol {command}: error: {e}", file=sys.stderr)
    return 2
  try:
    rest = configs.resolve_argv(rest)
  except configs.UnknownConfigError as e:
    print(f"jaxvol {command}: error: {e}", file=sys.stderr)
    return 2
  return _run_absl(f"jaxvol {command}", [f"--mode={command}", *rest])


def import_argv(args: list[str]) -> list[str]:
  """`import`'s own arguments as jaxvol.main's flags: --from X -> --import_from=X, --weights W ->
  --import_weights=W, and the one positional argument (the checkpoint) -> --import_checkpoint."""
  out, i, positional = [], 0, []
  names = {"--from": "--import_from", "--weights": "--import_weights"}
  while i < len(args):
    a = args[i]
    key, eq, value = a.partition("=")
    if key in names:
      if not eq:
        i += 1
        value = args[i] if i < len(args) else ""
      out.append(f"{names[key]}={value}")
    elif not a.startswith("-"):
      positional.append(a)
    else:
      out.append(a)
    i += 1
  if len(positional) > 1:
    raise ValueError(f"one checkpoint file, got {positional}")
  out += [f"--import_checkpoint={p}" for p in positional]
  return out


def _run_absl(program: str, args: list[str]) -> int:
  """absl's app.run of jaxvol.main.main on `program args...` (flags parsed into absl's FLAGS)."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from jaxvol import main as main_lib  # pylint: disable=import-outside-toplevel
  del app
  return _call(program, lambda a: main_lib.run([program, *a]), args)


def _call(program: str, fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
  """fn(argv) with sys.argv[0] = `program` (argparse and absl name the program from it), its
  SystemExit turned into the returned status."""
  saved = sys.argv
  sys.argv = [program, *argv]
  try:
    status = fn(argv)
  except SystemExit as e:
    status = e.code
  finally:
    sys.argv = saved
  if status is None or isinstance(status, int):
    return status or 0
  print(status, file=sys.stderr)  # sys.exit("message"), as Python itself reports it
  return 1


if __name__ == "__main__":
  sys.exit(main())
