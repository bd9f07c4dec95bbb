"""nm_hf.keep_freed_memory: after it, freeing and re-allocating a large tensor takes no new page faults.

Run in a subprocess: the allocator settings are process-wide and must not leak into the test session."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

CHURN = """
import resource, sys, torch, nm_hf

def faults_of_churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_churn()
applied = nm_hf.keep_freed_memory()
faults_of_churn()  # the heap grows once to hold the block
kept = faults_of_churn()
print(applied, default, kept)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120, check=True)
    applied, default, kept = out.stdout.split()
    assert applied == "True"
    pages = 4 * 64 * 2**20 // 4096
    assert int(kept) < pages // 50  # kept: the same heap memory again
    # glibc's default maps every block afresh and faults it in: one fault per 4 KiB page, or per 2 MiB where
    # transparent huge pages back the mapping (THP "always", or torch's THP_MEM_ALLOC_ENABLE=1)
    assert int(default) > max(pages // 512, 20 * int(kept))


def test_off_glibc_it_changes_nothing(monkeypatch):
    import nm_hf

    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("musl", "1.2"))
    assert nm_hf.keep_freed_memory() is False


SHIM = """
#include <stddef.h>
extern void *__libc_malloc(size_t size);
void *malloc(size_t size) { return __libc_malloc(size); }  /* another allocator's malloc, as LD_PRELOAD puts it */
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the preloaded malloc")
def test_with_another_malloc_preloaded_it_says_it_changed_nothing(tmp_path):
    """jemalloc or tcmalloc through LD_PRELOAD: glibc's settings would be set but never used, so the
    recipes' record must not claim them."""
    source = tmp_path / "shim.c"
    source.write_text(SHIM)
    library = tmp_path / "libshim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    script = "import nm_hf; print(nm_hf.keep_freed_memory())"
    preloaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               check=True, env={**os.environ, "LD_PRELOAD": str(library)})
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert preloaded.stdout.split()[-1] == "False" and plain.stdout.split()[-1] == "True"
