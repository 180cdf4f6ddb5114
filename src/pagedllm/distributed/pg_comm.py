"""The all-reduce the native decoder stack calls where the ranks share no memory (Ray across
machines): a torch op, `pagedllm_tp::all_reduce`, whose kernel is this module's Python
function over the tensor-parallel process group (gloo on CPU).

decoder_stack.cpp looks the op up by name and calls it through the dispatcher between a
layer's parts, as it calls the shared-memory all-reduce on one host, so the ranks stay in
one native call per step either way. The sum is taken in fp32, as the shared-memory op takes
it: a bf16 tensor is widened, summed and rounded once, and every rank gets the same bits.

Which of the two the ranks use is chosen at start (distributed/utils.py:
`use_shm_collectives`): shared memory when every rank is on one host, unless
PAGEDLLM_TP_COMM=process_group forces the process group (to test this path on one host, or
to compare the two).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagedllm.distributed.parallel_state import get_tp_group

# All-reduces this process ran through the op, read by tests (the stack really called it).
num_all_reduces = 0


def _all_reduce(x: torch.Tensor) -> None:
    global num_all_reduces
    num_all_reduces += 1
    group = get_tp_group().group
    if x.dtype == torch.float32:
        dist.all_reduce(x, group=group)
        return
    wide = x.float()
    dist.all_reduce(wide, group=group)
    x.copy_(wide)


_LIBRARY = torch.library.Library("pagedllm_tp", "DEF")
_LIBRARY.define("all_reduce(Tensor(a!) x) -> ()")
_LIBRARY.impl("all_reduce", _all_reduce, "CPU")
