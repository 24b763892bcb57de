"""The layers of docs/architecture.md, read from the import graph (ast; nothing is imported).

Each rule fails on the first import that breaks it, naming the file, the line and the module:
- eval/ imports from train/ only the checkpoint helpers (sampling lives in eval/samplers.py,
  device layout and compiled costs in jaxvol/parallel/);
- inverse/ (operators, priors, solvers, classical methods) imports nothing from eval/;
- data/ and ops/ import nothing from models/, methods/, train/ or eval/;
- models/ imports nothing from methods/, train/ or eval/; methods/ nothing from train/ or eval/;
- parallel/ imports nothing from train/, eval/ or methods/;
- experiments/ do not import each other by path or edit sys.path (a script imports a sibling by
  name, as `python experiments/NAME.py` allows, and the library's shared pieces from
  jaxvol.experiment), except the scripts listed in EXPERIMENTS_NOT_YET_ON_THE_LIBRARY (a list
  that may only shrink: a script that no longer needs its entry fails the test until removed).
"""

import ast
import pathlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "jaxvol"

# Scripts that still reach other files by path or through sys.path (none left; a script that
# needs to would be listed here, and the list may only shrink).
EXPERIMENTS_NOT_YET_ON_THE_LIBRARY = frozenset()


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, dotted name) of every import in a file, function-level ones included;
  `from jaxvol.x import y` yields jaxvol.x.y (y a module or a name in jaxvol.x)."""
  tree = ast.parse(path.read_text(), str(path))
  package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against the file's package
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
  return out


def layer_files(layer: str) -> list[pathlib.Path]:
  return sorted((PACKAGE / layer).rglob("*.py"))


def offenders(layer: str, allowed, forbidden_prefixes) -> list[str]:
  bad = []
  for path in layer_files(layer):
    for line, module in imports_of(path):
      if any(module == p or module.startswith(p + ".") for p in forbidden_prefixes) and \
          not allowed(module):
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
  return bad


@pytest.mark.parametrize("layer,forbidden,allowed", [
    ("eval", ("jaxvol.train",), ("jaxvol.train.checkpoint",)),
    ("inverse", ("jaxvol.eval",), ()),
    ("data", ("jaxvol.models", "jaxvol.methods", "jaxvol.train", "jaxvol.eval"), ()),
    ("ops", ("jaxvol.models", "jaxvol.methods", "jaxvol.train", "jaxvol.eval"), ()),
    ("models", ("jaxvol.methods", "jaxvol.train", "jaxvol.eval"), ()),
    ("methods", ("jaxvol.train", "jaxvol.eval"), ()),
    ("parallel", ("jaxvol.train", "jaxvol.eval", "jaxvol.methods"), ()),
])
def test_layers_import_only_downwards(layer, forbidden, allowed):
  assert layer_files(layer), f"jaxvol/{layer} has no files: the rule checks nothing"
  bad = offenders(layer, lambda m: any(m == a or m.startswith(a + ".") for a in allowed),
                  forbidden)
  assert not bad, "\n".join(bad)


def _reaches_by_path(path: pathlib.Path) -> list[str]:
  """Lines of a script that edit sys.path or load a module from a file path."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Attribute):
      chain = []
      n = node
      while isinstance(n, ast.Attribute):
        chain.append(n.attr)
        n = n.value
      if isinstance(n, ast.Name):
        chain.append(n.id)
      dotted = ".".join(reversed(chain))
      if dotted in ("sys.path.insert", "sys.path.append", "importlib.util.spec_from_file_location"):
        found.append(f"{path.name}:{node.lineno} {dotted}")
  return found


def test_experiments_do_not_import_each_other_by_path():
  scripts = sorted((ROOT / "experiments").glob("*.py"))
  assert scripts
  reaching = {p.name: _reaches_by_path(p) for p in scripts}
  new = [line for name, lines in reaching.items() if name not in EXPERIMENTS_NOT_YET_ON_THE_LIBRARY
         for line in lines]
  assert not new, "experiments reach other files by path (use the library):\n" + "\n".join(new)
  fixed = sorted(n for n in EXPERIMENTS_NOT_YET_ON_THE_LIBRARY if not reaching.get(n))
  assert not fixed, f"no longer reach by path, remove from the list: {fixed}"


def test_the_rules_see_real_imports(tmp_path):
  """The reader finds the kinds of import the rules rely on (so a rule cannot pass vacuously)."""
  found = dict((m, line) for line, m in imports_of(PACKAGE / "eval" / "evaluate.py"))
  assert "jaxvol.train.checkpoint" in found or "jaxvol.eval.samplers" in found
  assert "jaxvol.eval.samplers" in found
  lines = imports_of(PACKAGE / "predict.py")  # imports inside functions count too
  assert any(m == "jaxvol.train.checkpoint" for _, m in lines)
  bad = offenders("inverse", lambda m: False, ("jaxvol.ops",))
  assert bad, "inverse/ does import ops/: the offender scan must report it"
