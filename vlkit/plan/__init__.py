"""``vlkit plan``: per-GPU training memory of each stage of a recipe, without downloading or building the model.

What is counted (bytes are decimal: 1 GB = 10^9 bytes)
------------------------------------------------------
weights
    Every parameter in its storage dtype (LLM: the recipe's ``llm.dtype``; HF encoders: the checkpoint's dtype,
    as transformers' ``dtype="auto"`` loads them; projector and LoRA adapters: fp32, as vlkit and peft create
    them). ZeRO-3 shards all of them (frozen ones too) across ``gpus``.
gradients
    Trainable parameters only, in the parameter dtype. Sharded from ZeRO-2 on.
optimizer
    AdamW: two fp32 moments per trainable parameter, plus an fp32 master copy when the parameter itself is
    16-bit (mixed precision): 8 or 12 bytes per parameter. Sharded from ZeRO-1 on.
activations
    What autograd keeps for backward at the peak (the start of the backward pass of one micro-batch). vlkit's
    micro-batch ``batch_size / grad_accum`` is global: with several GPUs each takes ``1/gpus`` of it
    (``vlkit.distributed.shard_batch``). Sequence length: ``data.max_length`` (or ``seq_len``), image tokens
    included. Per decoder layer and token (``a`` = compute bytes: 2 under bf16/fp16 autocast on a GPU, 4 in
    fp32): the two RMSNorm inputs in fp32 (8h), SDPA's q, k, v, output (k/v repeated to all heads when a padding
    mask is present, as transformers does) and its logsumexp, the per-layer attention-mask bias SDPA keeps
    (B x T x T in the compute dtype; no T x T attention probabilities), and the gated MLP's 3 intermediates.
    Trainable weights add the tensors their gradients need (the normed inputs and the down-projection input for
    ``llm: full``; each LoRA adapter's (dropped-out) input, its dropout mask and its rank-r projection for
    ``llm: lora``). With gradient checkpointing only every layer's input is kept, plus one recomputed layer. A
    frozen LLM still keeps what input gradients need (the projector is trained through it). The LM head runs on
    the supervised positions only (``supervised_frac`` of the tokens): fp32 log-probabilities plus two gradient
    buffers of that size. The backward pass adds the gradient buffers in flight inside the last layer (about one
    intermediate-size and two hidden-size gradients per token). Gradients stack on this peak only when they
    persist (grad_accum > 1, several GPUs, ZeRO); otherwise they replace activations freed during the backward
    pass. A frozen vision encoder keeps nothing for backward, but its forward pass briefly holds every hidden
    state (HF towers return them all): the larger of the two phases counts. Unfrozen encoder blocks keep their
    activations. The projector's saved tensors are measured by running it once on a zero feature map (CPU).
overhead
    A fixed allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator slack (``overhead_gb``); 0 for
    ``device="cpu"``. ZeRO-3 also holds the gathered parameters of the largest module plus one prefetched layer.

Architecture facts come from the component configs: a local directory's ``config.json`` (``toy:`` paths once the
toy world is built), else the HF cache, else a built-in table of the published configs of the models the shipped
recipes use, else the hub (only when online). Parameters are counted in closed form for the Qwen2/Qwen3/Llama/
Mistral and CLIP/SigLIP vision layouts (checked against the transformers classes), and by instantiating
transformers' class on the ``meta`` device (no memory, no weights) for any other architecture; timm/open_clip
encoders are instantiated on the meta device too. The source used is reported for each component. Only
``prefix`` fusion (image tokens in the sequence, LLaVA) is modelled.

Accuracy: ``benchmarks/bench_memory_planner.py`` compares the planner with the peak RSS of real vlkit training
steps of the toy recipe on a CPU (fp32): within a few percent (see ``benchmarks/results/memory_planner.json``).
The GPU-specific parts (bf16 autocast, CUDA SDPA kernels, the caching allocator, ZeRO buffers) are modelled,
not measured.

Modules: ``configs`` (where the architecture facts come from), ``shapes`` (the LLM, encoder and projector
described), ``terms`` (bytes per token of one layer / block), ``stage`` (the per-stage plan), ``report`` (printing).
"""

from __future__ import annotations

from vlkit.plan.configs import CONFIG_DEFAULTS, DTYPE_BYTES, GB, KNOWN_CONFIGS, LoadedConfig, load_config
from vlkit.plan.report import print_plan
from vlkit.plan.shapes import (
    EncoderSpec,
    LLMSpec,
    VisionSpec,
    describe_encoder,
    describe_llm,
    describe_vision,
    saved_bytes,
)
from vlkit.plan.stage import Plan, Row, StagePlan, plan, plan_stage, recipe_zero
from vlkit.plan.terms import compute_bytes, llm_layer_terms

__all__ = [
    "CONFIG_DEFAULTS", "DTYPE_BYTES", "GB", "KNOWN_CONFIGS", "LoadedConfig", "load_config", "print_plan", "EncoderSpec",
    "LLMSpec", "VisionSpec", "describe_encoder", "describe_llm", "describe_vision", "saved_bytes", "Plan", "Row",
    "StagePlan", "plan", "plan_stage", "recipe_zero", "compute_bytes", "llm_layer_terms",
]
