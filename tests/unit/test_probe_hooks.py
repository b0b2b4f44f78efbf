"""benchmarks.probe's counters (benchmarks/probe_hooks/sitecustomize.py) name classes and
methods of crishim: a name that went away disabled the counters of its whole module,
silently (the stream-pair channels and forward.py's hooks were lost so)."""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECK = """
import importlib, sys
from sitecustomize import _TARGETS
for mod in _TARGETS:
    importlib.import_module(mod)
import crishim.app, crishim.client.cli  # what serve and port-forward import besides
missing = []
for mod, items in _TARGETS.items():
    m = sys.modules[mod]
    for cls, meth in items:
        owner = m if cls is None else getattr(m, cls, None)
        f = getattr(owner, meth, None) if owner is not None else None
        if getattr(f, "__name__", "") != "counted":
            missing.append(f"{mod}:{cls}.{meth}")
print("missing:", missing)
"""


def test_every_probe_target_exists_and_is_wrapped():
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, CRISHIM_PROBE=out, PYTHONPATH=os.pathsep.join(
            [os.path.join(ROOT, "benchmarks", "probe_hooks"), ROOT,
             os.path.join(ROOT, "plugins")]))
        result = subprocess.run([sys.executable, "-c", _CHECK], env=env, cwd=out,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("missing: []"), result.stdout
