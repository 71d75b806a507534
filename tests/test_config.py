"""config.py: --key=value parsing, types, ranges, renamed keys, --help; and that the torch-free
modules and Dataset_download.py really run where torch is absent."""
import os
import subprocess
import sys

import pytest

from lumina import config as C
from conftest import ROOT


def test_overrides_parse_types_and_refuse_bad_keys():
    defaults = {"lr": 1e-3, "layers": 2, "compile": False, "name": "x", "langs": ["en"]}
    out = C.apply_overrides(defaults, ["--lr=3e-4", "--layers=4", "--compile=true", "--langs=None"])
    assert out == {"lr": 3e-4, "layers": 4, "compile": True, "name": "x", "langs": None}
    assert C.apply_overrides(defaults, ["--lr=1"])["lr"] == 1.0
    with pytest.raises(C.ConfigError, match="unknown config key 'lrr'; valid keys: lr, layers"):
        C.apply_overrides(defaults, ["--lrr=1"])
    with pytest.raises(C.ConfigError, match="--layers expects int, got 'abc'"):
        C.apply_overrides(defaults, ["--layers=abc"])
    with pytest.raises(C.ConfigError, match="--key=value"):
        C.apply_overrides(defaults, ["layers"])


def test_space_separated_values_bare_booleans_and_comma_lists():
    defaults = {"source": None, "force": False, "langs": ["en"], "prompt": None}
    out = C.apply_overrides(defaults, ["--source", "~/data", "--force", "--langs=en,de", "--prompt", "42"],
                            types={"source": str, "prompt": str})
    assert out == {"source": "~/data", "force": True, "langs": ["en", "de"], "prompt": "42"}
    with pytest.raises(C.ConfigError, match="--source needs a value"):
        C.apply_overrides(defaults, ["--source"], types={"source": str})


def test_rules_and_renamed_keys_give_one_line_messages():
    with pytest.raises(C.ConfigError, match="warmup must be between 0.0 and 0.5, got 0.9"):
        C.check_rules({"warmup": 0.9}, {"warmup": (0.0, 0.5)})
    with pytest.raises(C.ConfigError, match="mode must be one of a, b, got 'c'"):
        C.check_rules({"mode": "c"}, {"mode": ("a", "b")})
    assert C.check_rules({"size": None}, {"size": (1, 10)}) == {"size": None}  # None: the preset decides
    with pytest.raises(C.ConfigError, match="--old was renamed: use --new"):
        C.apply_overrides({"new": 1}, ["--old=2"], renamed={"old": "use --new"})


def test_parse_cli_positional_paths_flags_help_and_exit_code(capsys, tmp_path):
    script = tmp_path / "stage.py"
    script.write_text('"""stage.py: does a thing.\n\nRun: python stage.py"""\nCONFIG = {\n    "n": 1,  # how many\n}\n')
    config, flags, paths = C.parse_cli(["a.pth", "--resume", "--n", "3"], {"n": 1}, str(script),
                                       flags=("resume",), positional=1)
    assert (config, flags, paths) == ({"n": 3}, {"resume": True}, ["a.pth"])
    with pytest.raises(SystemExit) as exit_:
        C.parse_cli(["a.pth", "b.pth"], {"n": 1}, str(script), positional=1)
    assert exit_.value.code == 2 and "unexpected argument 'b.pth'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        C.parse_cli(["--help"], {"n": 1}, str(script))
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "stage.py: does a thing." in out and '"n": 1,  # how many' in out


@pytest.fixture
def no_torch(tmp_path):
    """An environment where `import torch` fails, as on a machine that never installed it."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    return {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_config_data_and_dataset_download_need_no_torch(no_torch, tmp_path):
    assert subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True).returncode != 0
    out = subprocess.run([sys.executable, "-c", "import lumina, lumina.config, lumina.data, lumina.vocab, Dataset_download"], cwd=ROOT, env=no_torch,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    script = os.path.join(ROOT, "Dataset_download.py")
    out = subprocess.run([sys.executable, script, "--help"], env=no_torch, capture_output=True, text=True)
    assert out.returncode == 0 and '"branches": "best",' in out.stdout
    out = subprocess.run([sys.executable, script, "--source=sample", f"--out_dir={tmp_path / 'out'}"], env=no_torch,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "train.jsonl").stat().st_size > 10000
