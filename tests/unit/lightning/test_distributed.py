"""DDP helpers: a gloo process group is destroyed when its process exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# a one-rank gloo group in a fresh interpreter; the exit handlers are run as interpreter shutdown runs them
SCRIPT = """
import atexit, sys
import torch.distributed as dist
from spe_lightning.lightning.distributed import destroy_gloo_group_at_exit
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
counts = [atexit._ncallbacks()]
for _ in range(int(sys.argv[2])):
    destroy_gloo_group_at_exit()
    counts.append(atexit._ncallbacks())
atexit._run_exitfuncs()
print(*counts, dist.is_initialized())
"""


def _run(tmp_path: Path, calls: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / f"store{calls}"), str(calls)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_gloo_group_is_destroyed_at_exit_and_the_clean_up_registered_once(tmp_path):
    first, after_one, after_two, alive = _run(tmp_path, 2)
    assert int(after_one) == int(first) + 1 and after_two == after_one and alive == "False"
    # without it the group outlives the exit handlers (what makes a spawned worker abort at shutdown)
    assert _run(tmp_path, 0)[-1] == "True"
