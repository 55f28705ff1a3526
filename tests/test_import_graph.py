"""lmjax's import graph has no cycle, and every module imports on its own.

The graph is read from the source with `ast`: every `import lmjax...` and
`from lmjax... import ...` (relative ones resolved), at the top of a module or
inside a function (a lazy import that closes a loop is still a loop in the
design). `from lmjax.x import y` is an edge to the module `lmjax.x.y` when that is
a module, else to `lmjax.x`; a package is the module its `__init__.py` defines.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque

from tiny import ROOT

PACKAGE = "lmjax"


def module_files(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: file} of every module under `package` (packages by __init__)."""
  out = {}
  for folder, dirs, names in os.walk(os.path.join(root, package)):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(names):
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
      out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
  return out


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
  """The `PACKAGE` modules one import statement names."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
    return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:  # relative: from the module's package, up level - 1 more
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - node.level + 1]
    base = ".".join(parts + ([base] if base else []))
  if base != PACKAGE and not base.startswith(PACKAGE + "."):
    return []
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  """{module: the package's modules it imports anywhere in its body}."""
  files = module_files(root, package)
  known = set(files)
  graph: dict[str, set[str]] = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    graph[module] = {m for node in ast.walk(tree)
                     for m in _imported(node, module, is_package, known) if m in known}
  return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with a cycle (Tarjan's algorithm, iterative)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, edges = work[-1]
      for nxt in edges:
        if nxt not in index:
          index[nxt] = low[nxt] = len(index)
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(sorted(graph[nxt]))))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          members = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            members.append(member)
            if member == node:
              break
          if len(members) > 1 or node in graph[node]:
            found.append(sorted(members))
  return found


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
  """The shortest chain start -> ... -> start inside one component (breadth first)."""
  before = {start: None}
  queue = deque([start])
  while queue:
    node = queue.popleft()
    for nxt in sorted(graph[node] & within):
      if nxt == start:
        chain = [node]
        while before[chain[-1]] is not None:
          chain.append(before[chain[-1]])
        return chain[::-1] + [start]
      if nxt not in before:
        before[nxt] = node
        queue.append(nxt)
  return []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Import cycles as chains [a, b, ..., a]: for each component with a cycle, the
  shortest cycle through each of its modules, each cycle once."""
  cycles, seen = [], set()
  for members in _components(graph):
    for start in members:
      chain = _shortest_cycle(graph, start, set(members))
      key = frozenset(zip(chain, chain[1:]))
      if chain and key not in seen:
        seen.add(key)
        cycles.append(chain)
  return cycles


def test_the_cycle_finder_finds_direct_lazy_relative_and_package_cycles(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  files = {
      "__init__.py": "",
      "a.py": "from lmjax import b\n",
      "b.py": "def f():\n  import lmjax.a  # lazy: still a cycle\n",
      "c.py": "from lmjax.sub import thing\n",  # a name in sub/__init__: an edge to lmjax.sub
      "d.py": "import lmjax.a\n",  # imports into a cycle, is in none
      "sub/__init__.py": "from .leaf import thing\n",
      "sub/leaf.py": "from .. import c\nthing = 1\n",
  }
  for name, text in files.items():
    (pkg / name).write_text(text)
  graph = import_graph(str(tmp_path))
  assert graph["lmjax.sub"] == {"lmjax.sub.leaf"} and graph["lmjax.c"] == {"lmjax.sub"}
  cycles = find_cycles(graph)
  assert sorted(map(tuple, cycles)) == [
      ("lmjax.a", "lmjax.b", "lmjax.a"),
      ("lmjax.c", "lmjax.sub", "lmjax.sub.leaf", "lmjax.c")]


def test_lmjax_has_no_import_cycle():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
  """Each module imported first, in one process: lmjax's modules are dropped from
  sys.modules before each (third-party ones stay loaded, which keeps this fast)."""
  modules = sorted(module_files())
  script = (
      "import importlib, sys, traceback\n"
      f"failed = []\n"
      f"for name in {modules!r}:\n"
      "  for loaded in [m for m in sys.modules if m == 'lmjax' or m.startswith('lmjax.')]:\n"
      "    del sys.modules[loaded]\n"
      "  try:\n"
      "    importlib.import_module(name)\n"
      "  except Exception as e:\n"
      "    failed.append(f'{name}: {type(e).__name__}: {e}')\n"
      "print('\\n'.join(failed))\n"
      "sys.exit(1 if failed else 0)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
