"""Freed memory kept for reuse (`lrem._malloc`): loading a model on the CPU sets glibc's thresholds,
so that a forward's tensors stop faulting their pages in again; LREM_MALLOC=system and the user's
own malloc settings leave glibc's defaults. Each case runs in a fresh process (the thresholds are
process-wide, and glibc reads its MALLOC_*_ variables at start-up)."""
from __future__ import annotations

import doctest
import json
import os
import platform
import subprocess
import sys

import pytest

import lrem._malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# loads a model as `lrem` does, then allocates and frees a 48 MiB tensor (a batch's activations)
# five times after a first, and counts the process's minor page faults meanwhile. glibc's own
# threshold never rises past 32 MiB, so it maps every such block afresh (12,288 faults each);
# kept memory is reused (0 here, or one block's where the heap had to grow once more)
PROBE = """
import json, resource, sys, torch
from lrem._malloc import keep_freed_memory
from lrem.model import LREM
LREM.from_pretrained(sys.argv[1], dtype="float32", log=lambda *a: None)
torch.ones(12 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(12 << 20)
print(json.dumps({"kept": keep_freed_memory(), "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(model_dir, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LREM_MALLOC"))}
    r = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], capture_output=True, text=True,
                       env={**base, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_loading_a_model_keeps_freed_memory_and_the_user_can_say_no(tiny_dir):
    kept, system = probe(tiny_dir), probe(tiny_dir, LREM_MALLOC="system")
    assert kept["kept"] is True and system["kept"] is False
    assert system["faults"] >= 5 * 12_000, system
    assert kept["faults"] <= 12_500, kept
    # a malloc setting of the user's own is theirs: nothing is set over it, and glibc's reading of it holds
    own = probe(tiny_dir, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert own["kept"] is False and own["faults"] >= 5 * 12_000, own


def test_a_bad_setting_is_named(tiny_dir):
    base = {k: v for k, v in os.environ.items() if not k.startswith("LREM_MALLOC")}
    code = "from lrem.model import LREM; LREM.from_pretrained(__import__('sys').argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True,
                       env={**base, "LREM_MALLOC": "jemalloc"}, timeout=300)
    assert r.returncode != 0 and "LREM_MALLOC='jemalloc'; expected 'keep' (the default) or 'system'" in r.stderr


def test_doctests():
    assert doctest.testmod(lrem._malloc).failed == 0
