"""The package's architecture, checked: layers import only downwards, no private
name crosses a module, one definition per fact, a public API, and the pure-Python
parts import without the compiled extension."""
from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import some

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "some"
MAX_LINES = 500
# Imports that may stay inside functions: optional or heavy dependencies,
# loaded only by the code that needs them.
LAZY_OK = {"yaml", "sklearn", "scipy", "matplotlib", "umap", "tokenizers", "datasets", "k_means_constrained",
           "huggingface_hub", "safetensors", "tensorboard", "torch.utils.tensorboard", "numpy", "pyarrow",
           "transformers", "lm_eval"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install import-linter)")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, str(config)], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layers_contract_holds():
    result = _lint_imports(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_a_module_that_imports_a_layer_above_breaks_the_contract(tmp_path):
    """The check can fail: ops importing the trainer (a layer far above) is caught."""
    # A copy under another name, so that the installed package does not shadow it.
    shutil.copytree(PACKAGE, tmp_path / "somecopy", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    config = (REPO / "pyproject.toml").read_text()
    contract = config[config.index("[tool.importlinter]"):]
    (tmp_path / "pyproject.toml").write_text(contract.replace('"some', '"somecopy').replace("some.", "somecopy."))
    (tmp_path / "somecopy" / "ops" / "upward.py").write_text("from ..runs import trainer  # noqa: F401\n")
    result = _lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0, result.stdout
    assert "somecopy.ops is not allowed to import somecopy.runs" in result.stdout
    assert "somecopy.ops.upward -> somecopy.runs" in result.stdout


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("some")):
                offenders += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name not in ("__version__", "_C")]
    assert not offenders, offenders


def test_imports_inside_functions_are_only_optional_dependencies():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                else:
                    continue
                for name in names:
                    if not any(name == ok or name.startswith(ok + ".") for ok in LAZY_OK):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, offenders


def test_no_module_is_longer_than_a_sitting():
    long = {str(p.relative_to(REPO)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_public_api():
    for name in ("SoMEConfig", "get_preset", "PRESETS", "SoMELayer", "SoMELayerConfig", "SoMEForCausalLM", "train",
                 "ops", "build_info", "__version__"):
        assert name in some.__all__, name
        assert getattr(some, name) is not None
    assert some.get_preset("A4").num_experts == 64
    assert some.SoMEForCausalLM is some.nn.SoMEForCausalLM
    assert callable(some.train) and some.ops.route is some.ops.api.route
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        some.nope  # noqa: B018


def test_the_layer_fields_are_defined_once():
    """The experiment config inherits the layer's and the architecture's fields
    (flat --set keys), it does not repeat them."""
    from some.construction import ConstructionConfig
    from some.engine import OptimConfig
    from some.nn import ModelConfig, SoMELayerConfig
    from some.runs import SoMEConfig

    assert issubclass(SoMEConfig, ModelConfig) and issubclass(ModelConfig, SoMELayerConfig)
    assert issubclass(SoMEConfig, OptimConfig) and issubclass(SoMEConfig, ConstructionConfig)
    owners = {}
    for cls in SoMEConfig.__mro__[1:]:
        for f in cls.__dict__.get("__annotations__", {}):
            owners.setdefault(f, []).append(cls.__name__)
    repeated = {f: o for f, o in owners.items() if len(o) > 1}
    assert not repeated, repeated
    assert not SoMEConfig.__dict__.get("__annotations__")  # the experiment config declares no field of its own
    layer_fields = [f.name for f in dataclasses.fields(SoMELayerConfig)]
    assert layer_fields == [f.name for f in dataclasses.fields(SoMEConfig)][:len(layer_fields)]


def test_the_user_config_carries_no_test_hooks():
    from some.runs import SoMEConfig

    assert not [f.name for f in dataclasses.fields(SoMEConfig) if f.name.startswith("debug")]


def test_pure_python_parts_import_without_the_compiled_extension():
    code = ("import sys; sys.modules['some._C'] = None\n"  # makes `import some._C` fail
            "import some, some.runs.config, some.analysis, some.analysis.plots, some.errors\n"
            "print(some.get_preset('A4').num_experts, some.ops.build_info()['native'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "False"]
