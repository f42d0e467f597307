"""Memory terms: bytes per element of the compute dtype, and the bytes per token that one decoder layer (per
training mode) and one trainable vision block keep for backward (see the package docstring)."""
from __future__ import annotations

import re

from vlkit.config import Recipe, StageConfig
from vlkit.plan.shapes import EncoderSpec, LLMSpec

def compute_bytes(recipe: Recipe, device: str) -> int:
    """Bytes per element of matmul activations: autocast (bf16/fp16) on a GPU, fp32 otherwise (as vlkit.train)."""
    if device != "cuda" or recipe.train.precision == "fp32":
        return 4
    return 2


def _lora_linears(llm: LLMSpec, target: list[str] | str) -> list[tuple[str, int, int]]:
    if target == "all-linear":
        return list(llm.layer_linears)
    if isinstance(target, str):
        return [lin for lin in llm.layer_linears if re.fullmatch(target, lin[0])]
    return [lin for lin in llm.layer_linears
            if any(lin[0] == t or lin[0].endswith("." + t) for t in target)]


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if re.search(r"q_proj|k_proj|v_proj|qkv|query|key|value|c_attn", leaf):
        return "attn_in"
    if re.search(r"o_proj|out_proj|dense$|c_proj", leaf) and "mlp" not in name:
        return "attn_out"
    if re.search(r"gate|up_proj|fc1|w1|w3|c_fc", leaf):
        return "mlp_in"
    return f"other:{name}"


def llm_layer_terms(llm: LLMSpec, mode: str, a: int, seq_len: int, padding_mask: bool, stage: StageConfig,
                    device: str) -> dict[str, float]:
    """Bytes per token saved for backward by one decoder layer (see the module docstring)."""
    h, w = llm.hidden, llm.dtype_bytes
    q_dim = llm.heads * llm.head_dim
    kv_dim = llm.kv_heads * llm.head_dim
    kv_eff = q_dim if padding_mask and llm.kv_heads != llm.heads else kv_dim  # repeat_kv when a mask is given
    inter = llm.intermediate
    terms: dict[str, float] = {
        "norm_inputs_fp32": 2 * 4 * h,
        "attention_qkvo": a * (2 * q_dim + 2 * kv_eff) + 4 * llm.heads,
        "attention_mask_bias": a * seq_len if padding_mask else 0,
        "mlp": a * inter * (3 if llm.gated_mlp else 1),
    }
    if mode == "full":
        terms["full_norm_outputs"] = 2 * (w * h + a * h)
        terms["full_down_input"] = a * inter
    elif mode == "lora":
        lin = _lora_linears(llm, stage.lora.target_modules)
        r = stage.lora.r
        mask = 1 if device == "cuda" else w
        if stage.lora.dropout > 0:
            terms["lora_inputs"] = sum((a + mask) * d_in for _, d_in, _ in lin)
        elif w == a:
            groups: dict[str, int] = {}
            for name, d_in, _ in lin:
                g = _group(name)
                if g != "attn_out":
                    groups[g] = d_in
            terms["lora_inputs"] = a * sum(groups.values())
        else:
            terms["lora_inputs"] = sum(a * d_in for _, d_in, _ in lin)
        terms["lora_rank"] = len(lin) * a * r
    return terms


def _enc_block_bytes(enc: EncoderSpec, a: int) -> float:
    """Bytes per token kept by one trainable ViT block."""
    r = 4 if a < 4 else enc.dtype_bytes  # LayerNorm inputs: upcast to fp32 under autocast
    return 2 * r * enc.hidden + 6 * a * enc.hidden + enc.act_saves * a * enc.intermediate
