"""The `jaxvol` command (jaxvol.cli): config names, dispatch, errors, and a non-editable install."""

import ast
import importlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile

import pytest

from conftest import ROOT
from conftest import load_module
import jaxvol
from jaxvol import cli
from jaxvol import configs
from jaxvol import convert_cli
from jaxvol import prepare

PACKAGED = ROOT / "jaxvol" / "configs"


def _docstring(path):
  return ast.get_docstring(ast.parse(pathlib.Path(path).read_text()))


def test_names_are_the_repository_configs_and_wrappers_reexport_them():
  stems = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
  assert configs.names() == stems and "ppdm_pet_denoise" in stems
  for name in stems:
    wrapper = load_module(ROOT / "configs" / f"{name}.py", f"wrapper_{name}")
    module = importlib.import_module(f"jaxvol.configs.{name}")
    assert wrapper.get_config is module.get_config, name
    # The wrapper points at the module, whose docstring (data, launch commands, variants) is the
    # one place they are written.
    assert f"jaxvol/configs/{name}.py" in _docstring(ROOT / "configs" / f"{name}.py"), name
    assert "python -m jaxvol.main" in _docstring(module.__file__), name
  assert configs.summary("ppdm_pet_denoise").startswith("PPDM for low-count PET denoising")
  assert "\n" not in configs.summary("full3d_mri_t1_t2")  # a two-line first paragraph, joined


def test_resolve_names_and_paths(tmp_path, monkeypatch):
  packaged = str(PACKAGED / "ppdm_pet_denoise.py")
  assert cli.resolve_config("ppdm_pet_denoise:smoke") == packaged + ":smoke"
  assert cli.resolve_config("ppdm_pet_denoise.py:smoke,whole") == packaged + ":smoke,whole"
  assert cli.resolve_config("ppdm_pet_denoise") == packaged
  monkeypatch.chdir(ROOT)  # an existing file is taken as given, also when it has a config's name
  path = "configs/ppdm_pet_denoise.py:smoke"
  assert cli.resolve_config(path) == path
  own = tmp_path / "ppdm_pet_denoise.py"
  own.write_text("def get_config(variant=None):\n  return None\n")
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config("ppdm_pet_denoise.py:x") == "ppdm_pet_denoise.py:x"
  assert cli.resolve_config("ppdm_pet_denoise:x") == packaged + ":x"
  argv = ["--config", "prdit_ct_gen:smoke", "--config.data.store=S", "-config=wdm_mri_t1_t2",
          "--", "--config=nothing"]
  assert configs.resolve_argv(argv) == [
      "--config", str(PACKAGED / "prdit_ct_gen.py") + ":smoke", "--config.data.store=S",
      "-config=" + str(PACKAGED / "wdm_mri_t1_t2.py"), "--", "--config=nothing"]


def test_unknown_config_names_the_available_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(configs.UnknownConfigError) as e:
    configs.resolve("ppdm_pet_denois:smoke")
  message = str(e.value)
  assert "unknown config 'ppdm_pet_denois'" in message
  assert "did you mean ppdm_pet_denoise?" in message
  assert all(name in message for name in configs.names()) and "\n" not in message
  with pytest.raises(configs.UnknownConfigError, match="unknown config 'zzzzzz'") as e:
    configs.resolve("zzzzzz")
  assert "did you mean" not in str(e.value)
  with pytest.raises(configs.UnknownConfigError, match=r"not found; the packaged one is "
                     r"--config=ppdm_pet_denoise:smoke"):
    configs.resolve("configs/ppdm_pet_denoise.py:smoke")  # run outside the checkout


def test_unknown_config_exits_2_with_one_line(capsys):
  assert cli.main(["train", "--config=ppdm_pet_denois:smoke", "--workdir=w"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jaxvol train: error: unknown config")
  assert "did you mean ppdm_pet_denoise?" in err


def test_commands_help_and_unknown_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for command in ("train", "evaluate", "sample", "plan", "predict", "convert", "prepare"):
    assert sum(line.startswith(f"  {command} ") for line in out.splitlines()) == 1, command
  assert cli.main(["trian", "--config=x"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown command 'trian'; did you mean train?" in err
  assert cli.main([]) == 2 and "usage: jaxvol COMMAND" in capsys.readouterr().err
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out.strip() == f"jaxvol {jaxvol.__version__}"


def test_mode_commands_build_the_absl_command_line(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(cli, "_run_absl", lambda program, args: calls.append((program, args)) or 7)
  assert cli.main(["evaluate", "--config", "ppdm_pet_denoise:smoke", "--workdir=W",
                   "--config.data.store=S"]) == 7
  assert calls == [("jaxvol evaluate", ["--mode=evaluate", "--config",
                                        str(PACKAGED / "ppdm_pet_denoise.py") + ":smoke",
                                        "--workdir=W", "--config.data.store=S"])]
  assert cli.main(["train", "--config=ppdm_pet_denoise", "--workdir=W", "--mode=sample"]) == 2
  assert "--mode is the subcommand" in capsys.readouterr().err and len(calls) == 1


def test_mode_help_lists_flags_and_configs(capsys):
  assert cli.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: jaxvol train --config=NAME_OR_PATH[:VARIANT] --workdir=DIR")
  assert "--workdir:" in out and "--config:" in out and "--mode" not in out
  assert "--plan_mesh" not in out
  assert all(f"  {name}: " in out for name in configs.names())
  assert cli.main(["help", "plan"]) == 0 and "--plan_mesh:" in capsys.readouterr().out


def test_module_commands_dispatch(monkeypatch, capsys):
  seen = {}

  def fake_main(argv):
    seen["argv"], seen["program"] = list(argv), sys.argv[0]
    if "--fail" in argv:
      raise SystemExit(3)
    return 0

  # Stands in for the predict module (imported only when `jaxvol predict` runs).
  monkeypatch.setitem(sys.modules, "jaxvol.predict", types.SimpleNamespace(main=fake_main))
  saved = list(sys.argv)
  assert cli.main(["predict", "--workdir", "W", "--input", "x.nii.gz"]) == 0
  assert seen == {"argv": ["--workdir", "W", "--input", "x.nii.gz"], "program": "jaxvol predict"}
  assert cli.main(["predict", "--fail"]) == 3 and sys.argv == saved
  for command in ("convert", "prepare"):
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: jaxvol {command} [-h]")
  assert cli.main(["convert", "--datalist", "x.csv"]) == 2  # argparse: --out is required
  assert "jaxvol convert: error" in capsys.readouterr().err


def test_tools_scripts_are_the_package_modules():
  convert = load_module(ROOT / "tools" / "convert.py", "convert_wrapper_under_test")
  assert convert.main is convert_cli.main and convert.parse_preset is convert_cli.parse_preset
  wrapper = load_module(ROOT / "tools" / "prepare_data.py", "prepare_wrapper_under_test")
  own = {k for k in vars(prepare) if not k.startswith("__")}
  assert own <= set(vars(wrapper)) and wrapper.prepare is prepare.prepare
  assert wrapper._training_presets is prepare._training_presets  # pylint: disable=protected-access
  assert "``pet_denoise``" in prepare.__doc__  # the tasks' documentation moved with the code


def test_python_m_jaxvol_main_takes_a_config_name(tmp_path):
  """`python -m jaxvol.main` resolves names too: a known one loads (and stops at the missing
  store), an unknown one prints one line and exits with status 2."""
  run = lambda config: subprocess.run(
      [sys.executable, "-m", "jaxvol.main", f"--config={config}", f"--workdir={tmp_path}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  r = run("ppdm_mri_t1_t2:smoke")
  assert r.returncode == 1 and "config.data.store is empty" in r.stdout + r.stderr, r.stderr
  r = run("ppdm_mri_t1_t3")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
  assert "did you mean ppdm_mri_t1_t2?" in r.stderr


def _setuptools_major():
  try:
    return int(importlib.metadata.version("setuptools").split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    return 0


@pytest.mark.skipif(_setuptools_major() < 77, reason="building jaxvol needs setuptools>=77 "
                    "(pyproject.toml's build-system); without it pip would download one")
@pytest.mark.slow
def test_non_editable_install_has_the_command_and_configs(tmp_path):
  """Builds a wheel offline, installs it into a fresh virtual environment and runs `jaxvol`
  there from a folder outside the checkout: the entry point, and configs found by name."""
  src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "jaxvol", src / "jaxvol",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                        str(tmp_path / "wheels"), str(src)], check=True, timeout=300)
  (wheel,) = (tmp_path / "wheels").glob("jaxvol-*.whl")
  with zipfile.ZipFile(wheel) as z:
    packaged = sorted(n[len("jaxvol/configs/"):-3] for n in z.namelist()
                      if n.startswith("jaxvol/configs/") and not n.endswith("__init__.py"))
  assert packaged == configs.names()

  # A fresh environment without pip or dependencies; this interpreter's site-packages (listed
  # in a .pth file, whose own .pth files, such as an editable jaxvol's, are not run) give it
  # pip and jaxvol's dependencies without downloading anything.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                 timeout=120)
  python = venv / "bin" / "python"
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True).stdout.strip()
  deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
  pathlib.Path(purelib, "_jaxvol_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
  subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                  "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)

  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  run = lambda *args: subprocess.run([str(a) for a in args], cwd=outside, env=env,
                                     capture_output=True, text=True, timeout=120)
  program = venv / "bin" / "jaxvol"
  r = run(program, "--help")
  assert r.returncode == 0 and "  train " in r.stdout and "  predict " in r.stdout, r.stderr
  r = run(python, "-c", "import jaxvol; from jaxvol import cli; print(jaxvol.__file__); "
          "print(cli.resolve_config('ppdm_pet_denoise:smoke'))")
  site = pathlib.Path(purelib).resolve()
  where, resolved = r.stdout.split()
  assert pathlib.Path(where).resolve() == site / "jaxvol" / "__init__.py", r.stderr
  assert resolved == f"{site / 'jaxvol' / 'configs' / 'ppdm_pet_denoise.py'}:smoke"
  r = run(program, "train", "--help")
  assert r.returncode == 0 and "  ppdm_pet_denoise: " in r.stdout, r.stderr
  # By name from the installed package through absl and jaxvol.main, up to the missing store.
  r = run(program, "train", "--config=ppdm_mri_t1_t2:smoke", f"--workdir={outside / 'run'}")
  assert r.returncode == 1 and "config.data.store is empty" in r.stdout + r.stderr, r.stderr
  r = run(program, "trian")
  assert r.returncode == 2 and "did you mean train?" in r.stderr


def _jaxvol(*args, cwd=None):
  import subprocess  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, "-m", "jaxvol", *args], capture_output=True, text=True,
                        check=False, cwd=cwd)


@pytest.mark.slow
def test_common_mistakes_are_one_line(tmp_path):
  """A misspelled override (with its "did you mean"), a missing store and a missing --workdir end
  in one line on stderr, not a traceback, with a usage (2) or input (1) exit status."""
  typo = _jaxvol("train", "--config=ppdm_pet_denoise:smoke", f"--workdir={tmp_path}/w",
                 "--config.train.stpes=5")
  assert typo.returncode == 2, typo.stderr
  assert typo.stderr.strip().splitlines()[-1:] == [
      "jaxvol train: error: no config field 'stpes'; did you mean 'steps'?"]
  assert "Traceback" not in typo.stderr
  store = _jaxvol("train", "--config=ppdm_pet_denoise:smoke", f"--workdir={tmp_path}/w",
                  f"--config.data.store={tmp_path}/nostore", "--config.mesh.data=1")
  assert store.returncode == 1 and "Traceback" not in store.stderr
  assert store.stderr.strip().splitlines()[-1].startswith("error: ") and "not a converted store" \
      in store.stderr
  workdir = _jaxvol("evaluate", "--config=ppdm_pet_denoise:smoke")
  assert workdir.returncode == 2 and "--workdir" in workdir.stderr and "Traceback" not in \
      workdir.stderr


def test_comma_separated_inputs_are_several_modalities():
  from jaxvol import main as main_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({"data": {"inputs": ("T1,T2 ",)}})
  assert main_lib.split_list_fields(c).data.inputs == ("T1", "T2")
