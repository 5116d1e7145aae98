"""Run Python code in a child process under Triton's interpreter (TRITON_INTERPRET=1), so Triton kernels
run on this CPU. The interpreter must be on before Triton compiles anything, hence a child per call."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, *args: str, timeout: float = 400) -> object:
    """The JSON the child's `code` prints on its last line (sys.argv[1:] = args); its stderr on failure."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
