"""The CPU worker's malloc settings: freed step buffers are reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

BUFFER_BYTES = 12 << 20  # a 2048-token step's MLP output in bf16

# Minor page faults of 8 'steps' that each malloc, write and free one buffer, in a fresh
# process: in this one, earlier tests leave free heap that would serve the buffer anyway.
PROBE = """
import ctypes, ctypes.util, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
# glibc's starting thresholds, held fixed: a buffer of this size is a mapping of its own.
assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)  # M_MMAP/M_TRIM_THRESHOLD
if sys.argv[1] == "kept":
    from pagedllm.worker.host_memory import keep_freed_buffers
    assert keep_freed_buffers()
size = int(sys.argv[2])
def step():
    buffer = libc.malloc(size)
    assert buffer
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
step()  # the first one faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_steps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(BUFFER_BYTES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@needs_glibc
@pytest.mark.skipif(huge_pages_always(), reason="THP 'always': mappings fault 2 MB at a time")
def test_freed_step_buffers_are_reused_without_page_faults():
    pages_per_step = BUFFER_BYTES // 4096
    assert page_faults_of_steps("fixed") >= 4 * pages_per_step  # each step faulted them again
    assert page_faults_of_steps("kept") < pages_per_step // 10


def test_the_cpu_worker_applies_them(tiny_llama_factory, monkeypatch):
    from pagedllm import LLM, SamplingParams
    from pagedllm.worker import worker

    calls = []
    real = worker.keep_freed_buffers
    monkeypatch.setattr(worker, "keep_freed_buffers", lambda: calls.append(1) or real())
    llm = LLM(str(tiny_llama_factory()), num_kv_blocks=16)
    assert calls == [1]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
