"""The package's layering (docs/architecture.md): no module imports a layer above its own, and
imports sit at the top of files (function-local imports only for optional heavy dependencies,
each with a comment saying why)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cot2align_jax"

# Lower number = lower layer. A module may import its own package and any lower layer.
LAYERS = {
    "core": 0,
    "models": 1,
    "alignment": 1,
    "data": 2,
    "losses": 3,
    "evaluation": 4,
    "training": 5,
    "demo": 6,
    "experiment": 7,
}
ENTRY_LAYER = 8  # cot2align_jax/<module>.py: the command-line entry points

# Optional heavy dependencies that may be imported inside a function (with a comment).
LAZY_ALLOWED = ("matplotlib", "torch", "tensorboardX", "transformers", "llama_cpp",
                "tensorflow", "tensorflow_datasets", "datasets", "pandas", "pyarrow")


def _unit(module: str) -> str:
  """'cot2align_jax.losses.ot' -> 'losses'; 'cot2align_jax.train' -> 'train'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int:
  return LAYERS.get(unit, ENTRY_LAYER)


def _module_name(path: Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imported(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
  """Absolute names of the project modules an import node brings in."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith("cot2align_jax")]
  if isinstance(node, ast.ImportFrom):
    if node.level:
      base = module.split(".")
      base = base[:len(base) - node.level + (1 if is_pkg else 0)]
      target = ".".join(base + ([node.module] if node.module else []))
    else:
      target = node.module or ""
    if not target.startswith("cot2align_jax"):
      return []
    return [target] + [f"{target}.{a.name}" for a in node.names]
  return []


def _sources():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 20, "the package was not found"
  return files


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
  """Import nodes at module level (including inside top-level try/if blocks)."""
  out, stack = [], list(tree.body)
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      out.append(node)
    elif isinstance(node, ast.If) and _is_type_checking(node):
      continue
    elif isinstance(node, (ast.Try, ast.If)):
      stack.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
      for h in getattr(node, "handlers", []):
        stack.extend(h.body)
  return out


def upward_imports(path: Path) -> list[str]:
  """'module -> imported (layer a < layer b)' for every import of a higher layer in `path`."""
  module = _module_name(path)
  own = _unit(module)
  tree = ast.parse(path.read_text(), str(path))
  bad = []
  for node in ast.walk(tree):
    for target in _imported(node, module, path.name == "__init__.py"):
      unit = _unit(target)
      if not unit or unit == own:
        continue
      if not (PACKAGE / unit).is_dir() and not (PACKAGE / f"{unit}.py").is_file():
        continue  # `from cot2align_jax import x` names: checked through their own entry
      if _layer(unit) >= _layer(own) and not (_layer(own) == ENTRY_LAYER and
                                               _layer(unit) < ENTRY_LAYER):
        bad.append(f"{module} imports {target} ({own} layer {_layer(own)} -> "
                   f"{unit} layer {_layer(unit)})")
  return bad


def local_imports(path: Path) -> list[str]:
  """Function-local imports that are not a commented optional heavy dependency."""
  text = path.read_text()
  lines = text.splitlines()
  tree = ast.parse(text, str(path))
  top = {id(n) for n in _top_level_imports(tree)}
  bad = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
      continue
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""])
    allowed = all(n.split(".")[0] in LAZY_ALLOWED for n in names)
    line = lines[node.lineno - 1]
    above = lines[node.lineno - 2] if node.lineno >= 2 else ""
    commented = "#" in line or above.strip().startswith("#")
    if not (allowed and commented):
      bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {line.strip()}")
  return bad


def test_layers_table_covers_every_package():
  packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


def test_no_upward_imports():
  bad = [b for f in _sources() for b in upward_imports(f)]
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_function_local_imports():
  bad = [b for f in _sources() for b in local_imports(f)]
  assert not bad, "function-local imports:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
  """The walker itself: a losses module importing training is reported, and so is a local
  import of a project module."""
  pkg = tmp_path / "cot2align_jax"
  (pkg / "losses").mkdir(parents=True)
  (pkg / "training").mkdir()
  for d in (pkg, pkg / "losses", pkg / "training"):
    (d / "__init__.py").write_text("")
  bad_file = pkg / "losses" / "bad.py"
  bad_file.write_text("from cot2align_jax.training import loop\n\n"
                      "def f():\n  from cot2align_jax.data import spec\n  return spec\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  assert upward_imports(bad_file) == [
      "cot2align_jax.losses.bad imports cot2align_jax.training (losses layer 3 -> training "
      "layer 5)",
      "cot2align_jax.losses.bad imports cot2align_jax.training.loop (losses layer 3 -> "
      "training layer 5)"]
  assert len(local_imports(bad_file)) == 1


@pytest.mark.parametrize("unit,layer", [("core", 0), ("losses", 3), ("train", ENTRY_LAYER)])
def test_layer_of(unit, layer):
  assert _layer(unit) == layer
