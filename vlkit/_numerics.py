"""Run-to-run reproducibility of CPU float math that torch's own switches do not cover.

torch computes ``cos``, ``sin``, ``exp``, ``tanh``, ``erf``, ... of float tensors with MKL's vector-math library
(VML), splitting large tensors over its threads. Measured (issue 17, 2-core Xeon, torch 2.14): in a few percent
of fresh processes the *first* VML call of the process came out a few ulps off (2 of 230 processes of a few lines
of torch; never seen with one torch thread); the same call again gave the usual values. In a training run the
LLM's rotary-embedding ``cos`` in step 1 was the first value that differed between a process that logged align
step 1 as 3.410152859157986 and one that logged 3.4101521809895834 (encoder, projector and token embeddings
before it bit-identical). With the warm-up below, 0 of 119 fresh processes logged the odd value, against 7 of
120 without it, alternating (docs/runs.md).
"""
from __future__ import annotations


def warm_up_vml() -> None:
    """Call VML's common functions once on small throw-away tensors (8 and threads x 4 096 elements), before any
    model runs, so that no later call is the process's first. This is the warm-up the 0-of-119 count measured."""
    import torch

    small = torch.full((8,), 0.5)
    large = torch.full((max(torch.get_num_threads(), 1) * 4096,), 0.5)
    for x in (small, large):
        for op in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.erf, torch.log, torch.sqrt):
            op(x)
