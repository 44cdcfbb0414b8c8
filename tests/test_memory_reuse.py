"""runtime_py.memory's two allocator settings: freed memory kept for reuse inside a block (and returned after
it), and numpy's transparent huge pages turned off for a command and the processes it starts. Each probe runs in a
fresh interpreter: a test process's heap, left fragmented by earlier tests, would blur the page counts."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator settings are glibc's (elsewhere the block is a no-op)")


def _probe(code: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=environ,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_REUSE_PROBE = """
import json, resource
import numpy as np
from runtime_py import memory

memory.avoid_numpy_huge_pages()  # small pages: one fault per 4 KiB page, which the counts below assume
PAGES = (64 << 20) // memory.PAGE_SIZE

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle():  # what a forward pass does with its activations: allocate 64 MiB arrays, touch them, free them
    before = faults()
    for _ in range(4):
        a = np.ones(16 << 20, np.float32)
        del a
    return faults() - before

start = memory.anon_rss_bytes()
plain = [cycle(), cycle()]
with memory.reuse_freed_memory():
    reused = [cycle(), cycle()]
    inside = memory.anon_rss_bytes() - start
    with memory.reuse_freed_memory():  # nested: leaving it keeps the outer block's heap
        pass
    after_inner = memory.anon_rss_bytes() - start
after = memory.anon_rss_bytes() - start
again = cycle()  # the defaults are back: freed arrays go back to the system
print(json.dumps(dict(pages=PAGES, plain=plain, reused=reused, inside=inside, after_inner=after_inner,
                      after=after, again=again)))
"""


@glibc_only
def test_freed_memory_is_reused_inside_the_block_and_returned_after_it():
    r = _probe(_REUSE_PROBE)
    pages, mib = r["pages"], 1 << 20
    # outside the block every 64 MiB array is a fresh mapping, faulted in page by page
    assert min(r["plain"]) > 0.9 * 4 * pages
    # inside, the first cycle faults one array's pages in, the second none: the heap serves them again
    assert r["reused"][0] < 1.5 * pages and r["reused"][1] < 0.05 * pages
    assert r["inside"] > 48 * mib and r["after_inner"] > 48 * mib  # kept while inside, also after a nested block
    assert r["after"] < 16 * mib  # given back on leaving the outermost block
    assert r["again"] > 0.9 * 4 * pages


_HUGEPAGE_PROBE = """
import json, os, subprocess, sys
from runtime_py import memory
changed = memory.avoid_numpy_huge_pages()
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('NUMPY_MADVISE_HUGEPAGE'))"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps(dict(changed=changed, env=os.environ.get("NUMPY_MADVISE_HUGEPAGE"), child=child)))
"""


def test_numpy_huge_pages_are_turned_off_for_the_process_and_its_children_unless_the_user_chose():
    assert _probe(_HUGEPAGE_PROBE) == {"changed": True, "env": "0", "child": "0"}
    assert _probe(_HUGEPAGE_PROBE, NUMPY_MADVISE_HUGEPAGE="1") == {"changed": False, "env": "1", "child": "1"}


def test_the_command_line_turns_numpy_huge_pages_off():
    code = ("import json, os, sys\nfrom gmcnn_mobile.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'env': os.environ.get('NUMPY_MADVISE_HUGEPAGE')}), file=sys.stdout)")
    assert _probe(code) == {"env": "0"}
