"""The package's layers: imports point down only, with no cycle between subpackages.

Layer order, bottom to top (a module may import its own layer's and lower layers' modules only):

  0  errors, storage                 exception types; local-or-URL paths (etils.epath)
  1  parallel                        mesh, logical-axis rules, jax.distributed
  2  data                            sources, transforms, masking, tokenizers, grain pipelines
  3  models                          linen modules (codebook.py fits a VQ codebook on data)
  4  peft, interop                   tree transforms (LoRA, freezing); foreign-weight load/export
  5  metrics                         measures on arrays and the sharded pass over a split
  6  objectives                      one module per objective, declaring its config and encoders
  7  train                           optimizer, state, THE loop, checkpoints, encoder restore
  8  config                          the shared config contract (+ each objective's check_config)
  9  evaluate                        protocols over checkpoints, evaluation CLI
  10 sweeps                          sweep grids, runs and their collection
  11 entry points                    every other top-level module: main, bench, bench_torch, plan
                                     (a new top-level module lands here)

What training needs from evaluation is below it (``metrics``) or handed in: the trainer passes
``train.restore.pretrained_encoder`` to objectives as their ``encoder_loader``.

Both module-level and function-local imports count (a function-local import hides a cycle from
Python, not from this test). Function-local imports are kept only for optional or heavy
third-party dependencies, each with a comment saying why.
"""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "medfm_jax"
LAYERS = (("errors", "storage"), ("parallel",), ("data",), ("models",), ("peft", "interop"), ("metrics",),
          ("objectives",), ("train",), ("config",), ("evaluate",), ("sweeps",))
ENTRY_POINTS = len(LAYERS)   # the layer of any top-level module not listed above
# Third-party modules that may be imported inside a function: optional extras (setup.py) or heavy
# imports only some code paths need.
LOCAL_IMPORTS_ALLOWED = ("torch", "transformers", "safetensors", "pydicom", "nibabel", "tensorflow_datasets",
                         "array_record", "tokenizers", "sentencepiece", "kubernetes", "tensorboardX",
                         "jax._src", "scipy")


def _group(module: str) -> str:
  """``medfm_jax.models.vit`` -> 'models'; ``medfm_jax.main`` -> 'main'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def layer_of(group: str) -> int:
  for i, names in enumerate(LAYERS):
    if group in names:
      return i
  if (PACKAGE / group).is_dir():
    raise AssertionError(f"subpackage medfm_jax.{group} has no layer: add it to LAYERS")
  return ENTRY_POINTS


def _imports(tree: ast.Module, module: str):
  """(imported medfm_jax module, line, function-local?) for every import in ``tree``."""
  local = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      local.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: resolve against this module's package
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if base == "medfm_jax" else base for a in node.names]
    else:
      continue
    for t in targets:
      yield t, node.lineno, id(node) in local


def package_modules() -> dict[str, ast.Module]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = ast.parse(path.read_text(), str(path))
  return out


def check_layers(modules: dict[str, ast.Module]) -> list[str]:
  """Problems: upward imports and cycles between the groups (subpackages, top-level modules)."""
  problems, edges = [], {}
  for module, tree in modules.items():
    src = _group(module)
    for target, line, _ in _imports(tree, module):
      if not target.startswith("medfm_jax.") or _group(target) == src:
        continue
      dst = _group(target)
      edges.setdefault(src, {}).setdefault(dst, f"{module}:{line} imports {target}")
      if layer_of(dst) > layer_of(src):
        problems.append(f"upward import: {module}:{line} ({src}, layer {layer_of(src)}) imports "
                        f"{target} ({dst}, layer {layer_of(dst)})")
  # Cycles (possible within a layer: two groups of one layer importing each other).
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(edges.get(node, {})):
      if state.get(nxt) == "open":
        cycle = stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
        problems.append("import cycle: " + " -> ".join(cycle) + " (" + edges[node][nxt] + ")")
      elif nxt not in state:
        visit(nxt, stack + [node])
    state[node] = "done"
  for node in sorted(edges):
    if node not in state:
      visit(node, [])
  return problems


def check_local_imports(modules: dict[str, ast.Module], sources: dict[str, list[str]]) -> list[str]:
  """Problems: function-local imports of anything but LOCAL_IMPORTS_ALLOWED, or without a comment."""
  problems = []
  for module, tree in modules.items():
    for target, line, local in _imports(tree, module):
      if not local:
        continue
      allowed = any(target == a or target.startswith(a + ".") for a in LOCAL_IMPORTS_ALLOWED)
      if not allowed:
        problems.append(f"{module}:{line}: function-local import of {target}: move it to the top")
      elif not _reason(sources[module][line - 1]):
        problems.append(f"{module}:{line}: function-local import of {target} needs a comment saying why")
  return problems


def _reason(line: str) -> str:
  """The comment on ``line`` without lint pragmas (``pylint: disable=...``, ``noqa...``)."""
  comment = line.partition("#")[2]
  comment = re.sub(r"pylint:\s*disable=[\w,-]+|noqa(:\s*[\w,]+)?", "", comment)
  return comment.strip(" ()")


def _sources():
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text().splitlines()
  return out


def test_imports_point_down_and_have_no_cycles():
  modules = package_modules()
  assert "medfm_jax.objectives.base" in modules and "medfm_jax.train.loop" in modules
  problems = check_layers(modules)
  assert not problems, "\n".join(problems)


def test_function_local_imports_are_optional_dependencies_with_a_reason():
  problems = check_local_imports(package_modules(), _sources())
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    # Negative controls: the checks report a synthetic upward import (also one hidden in a
    # function), a cycle between two groups of one layer, and an unexplained local import.
    ({"medfm_jax.objectives.fake": "from medfm_jax.evaluate import protocols\n"},
     "upward import: medfm_jax.objectives.fake:1 (objectives, layer 6) imports medfm_jax.evaluate (evaluate, layer 9)"),
    ({"medfm_jax.data.fake": "def f():\n  from medfm_jax.train import loop\n"},
     "upward import: medfm_jax.data.fake:2 (data, layer 2) imports medfm_jax.train (train, layer 7)"),
    ({"medfm_jax.peft.fake": "from medfm_jax.interop import torch_io\n",
      "medfm_jax.interop.fake": "from medfm_jax import peft\n"},
     "import cycle: interop -> peft -> interop"),
])
def test_checker_reports_synthetic_violations(source, expected):
  modules = {name: ast.parse(text) for name, text in source.items()}
  assert any(p.startswith(expected) for p in check_layers(modules)), check_layers(modules)


def test_checker_reports_unexplained_local_import():
  text = ("def f():\n  from medfm_jax.models import vit\n  import torch\n"
          "  import torch as t  # pylint: disable=g-import-not-at-top\n  import torch as u  # optional extra\n")
  problems = check_local_imports({"medfm_jax.fake": ast.parse(text)}, {"medfm_jax.fake": text.splitlines()})
  assert problems == ["medfm_jax.fake:2: function-local import of medfm_jax.models: move it to the top",
                      "medfm_jax.fake:3: function-local import of torch needs a comment saying why",
                      "medfm_jax.fake:4: function-local import of torch needs a comment saying why"]
