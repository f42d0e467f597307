"""Run-to-run reproducibility of CPU float math that torch's own switches do not cover.

torch computes ``cos``, ``sin``, ``exp``, ``tanh``, ``erf``, ... of float tensors with MKL's vector-math library
(VML), splitting tensors of more than 2 048 elements over its threads. Measured (issue 17, 2-core Xeon, torch
2.14): in a few percent of fresh processes the *first* VML call of the process, made by two threads at once, came
out a few ulps off in one thread's chunk; the same call again in that process gave the usual values. In a training
run that first call is the LLM's rotary-embedding ``cos`` in step 1's forward: the first differing value between
a process that logged align step 1 as 3.410152859157986 and one that logged 3.4101521809895834 (everything before
it, encoder, projector and token embeddings, was bit-identical; the odd value came up in ~3% of runs, in bursts).
Warming VML up once, in one thread, before any parallel call removes the race from every later call.
"""
from __future__ import annotations


def warm_up_vml() -> None:
    """Let VML initialise in the calling thread alone, then once from every intra-op thread together.

    8 elements stay in the calling thread (below torch's parallel grain). The second round on a large tensor makes
    each thread's first call, and whatever a racing first call does to it is thrown away with its result."""
    import torch

    small = torch.full((8,), 0.5)
    large = torch.full((max(torch.get_num_threads(), 1) * 4096,), 0.5)
    for x in (small, large):
        for op in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.erf, torch.log, torch.sqrt):
            op(x)
