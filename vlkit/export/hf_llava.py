"""The ``hf-llava`` export format: what ``LlavaForConditionalGeneration`` can express of a recipe, and writing it
(weights, config, generation config, tokenizer, processor)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)

from vlkit import __version__
from vlkit.components.encoders import HFVisionEncoder
from vlkit.components.llms import HFCausalLM
from vlkit.components.projectors import LinearProjector, MLPProjector
from vlkit.components.tokens import ClsPatchTokens, PatchTokens
from vlkit.export.common import EXPORT_VERSION, ExportError, complete
from vlkit.registry import ENCODERS, LLMS, PROJECTORS, TOKEN_STRATEGIES

HF_ENCODERS = ("hf_clip", "hf_siglip")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def hf_llava_problems(recipe) -> list[str]:
    """Why a recipe cannot be exported as ``LlavaForConditionalGeneration`` (empty when it can), from the recipe
    alone (no weights loaded)."""
    problems = []

    def plugin(reg, name: str) -> str | None:
        try:
            src = reg.source(name)
        except Exception:  # noqa: BLE001 - unknown names are reported by the checks below
            return None
        return None if src == "built-in" else src

    enc = recipe.encoder.name
    if enc not in HF_ENCODERS or plugin(ENCODERS, enc):
        why = f"plugin {plugin(ENCODERS, enc)}" if plugin(ENCODERS, enc) else "not a Hugging Face vision tower"
        problems.append(f"encoder '{enc}' ({why}): LlavaForConditionalGeneration's vision_tower must be a "
                        f"transformers vision model; only {' / '.join(HF_ENCODERS)} export")
    tok = recipe.tokens.name
    if plugin(TOKEN_STRATEGIES, tok):
        problems.append(f"tokens '{tok}' (plugin {plugin(TOKEN_STRATEGIES, tok)}): HF Llava only selects tokens "
                        "with vision_feature_select_strategy; only patch / cls_patch export")
    elif tok not in ("patch", "cls_patch"):
        problems.append(f"tokens '{tok}': HF Llava feeds the projector all patch tokens ('default') or CLS + "
                        "patches ('full'); it cannot take a single CLS/pooled token, pool the patch grid or merge "
                        "its blocks; only patch / cls_patch export")
    elif tok == "cls_patch" and enc == "hf_siglip":
        problems.append("tokens 'cls_patch' with hf_siglip: SigLIP has no CLS token (vlkit's 'cls' there is the "
                        "attention-pooled feature, which HF Llava cannot prepend); use tokens=patch")
    proj = recipe.projector.name
    pp = recipe.projector.params()
    if plugin(PROJECTORS, proj):
        problems.append(f"projector '{proj}' (plugin {plugin(PROJECTORS, proj)}): HF Llava's projector is "
                        "linear_1 -> activation -> linear_2; only linear / mlp export")
    elif proj == "mlp":
        depth = int(pp.get("depth", 2))
        if depth > 2:
            problems.append(f"projector 'mlp' with depth {depth}: HF Llava's projector has exactly two linear "
                            "layers (linear_1 -> GELU -> linear_2); only depth 1 or 2 export")
    elif proj != "linear":
        problems.append(f"projector '{proj}': HF Llava's projector is a per-token linear_1 -> activation -> "
                        f"linear_2 and keeps the token count; '{proj}' is not expressible; only linear / mlp export")
    if pp.get("out_norm") is not None and not plugin(PROJECTORS, proj):
        problems.append(f"projector.out_norm '{pp['out_norm']}': HF Llava's projector ends in linear_2, with no norm "
                        "on its output; train with projector.out_norm=null to export to HF Llava, or export in "
                        "vlkit's format (--format vlkit)")
    fusion = recipe.fusion.name
    if fusion != "prefix":
        problems.append(f"fusion '{fusion}': HF Llava only splices the image embeddings into the text sequence "
                        "(prefix fusion); it has no cross-attention or other fusion layers")
    elif recipe.fusion.params().get("cells"):
        problems.append("fusion.cells: HF Llava's processor expands <image> into image tokens only; it cannot write "
                        "the cell names between them; export with --format vlkit, or train without fusion.cells")
    llm = recipe.llm.name
    if llm != "hf" or plugin(LLMS, llm):
        problems.append(f"llm '{llm}': HF Llava's language model must be a transformers causal LM (llm 'hf')")
    return problems


def _model_problems(model) -> list[str]:
    """Checks on the built model (types, dims) that the recipe alone cannot answer."""
    problems = []
    fusion = getattr(model, "fusion", None)
    if fusion is not None and (not getattr(fusion, "in_sequence", True) or any(True for _ in fusion.parameters())):
        problems.append(f"fusion {type(fusion).__name__}: HF Llava only splices image embeddings into the text "
                        "sequence, with no fusion parameters")
    enc = model.encoder
    if not isinstance(enc, HFVisionEncoder) or not hasattr(enc, "hf_model"):
        problems.append(f"encoder {type(enc).__name__}: not vlkit's HFVisionEncoder with an .hf_model")
    if type(model.tokens) not in (PatchTokens, ClsPatchTokens):
        problems.append(f"tokens {type(model.tokens).__name__}: only PatchTokens / ClsPatchTokens export")
    proj = model.projector
    llm = model.llm
    if not isinstance(llm, HFCausalLM):
        problems.append(f"llm {type(llm).__name__}: not vlkit's HFCausalLM")
        return problems
    hidden = llm.hidden_size
    if type(proj) is MLPProjector:
        linears = [m for m in proj.net if isinstance(m, nn.Linear)]
        acts = [m for m in proj.net if not isinstance(m, nn.Linear)]
        if len(linears) == 2:
            if linears[0].out_features != hidden:
                problems.append(f"projector 'mlp': hidden_dim {linears[0].out_features} != the LLM's hidden size "
                                f"{hidden}; HF Llava's linear_1 maps to the LLM's hidden size")
            if len(acts) != 1 or type(acts[0]) is not nn.GELU or acts[0].approximate != "none":
                problems.append("projector 'mlp': the activation is not exact GELU")
        elif len(linears) != 1:
            problems.append(f"projector 'mlp' with {len(linears)} linear layers: only 1 or 2 export")
    elif type(proj) is not LinearProjector:
        problems.append(f"projector {type(proj).__name__}: only LinearProjector / MLPProjector export")
    if getattr(proj, "out_norm", None) is not None:
        problems.append("projector out_norm: HF Llava's projector has no norm after linear_2")
    base = llm.base()
    head = base.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        problems.append("llm: the LM head has a bias (or there is none); HF Llava's lm_head is a bias-free Linear")
    return problems


def check_hf_llava(recipe, model=None) -> None:
    """Raise :class:`ExportError` listing every reason the recipe (and built model) cannot become HF Llava."""
    problems = hf_llava_problems(recipe)
    if not problems and model is not None:
        problems = _model_problems(model)
    if problems:
        raise ExportError(
            f"recipe '{recipe.name}' cannot be exported as hf-llava (LlavaForConditionalGeneration):\n  - "
            + "\n  - ".join(problems) + "\nuse --format vlkit, which exports every model"
        )


def _projector_weights(proj, hidden: int) -> tuple[dict[str, torch.Tensor], str]:
    """``multi_modal_projector`` tensors and ``projector_hidden_act`` for a vlkit linear / mlp projector."""
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    first = linears[0]
    sd = {"linear_1.weight": first.weight.detach(), "linear_1.bias": first.bias.detach()}
    if len(linears) == 2:
        sd.update({"linear_2.weight": linears[1].weight.detach(), "linear_2.bias": linears[1].bias.detach()})
        return sd, "gelu"
    # one linear map: linear_1 = the map, identity activation, linear_2 = identity (exact: x * 1 + 0)
    eye = torch.eye(hidden, dtype=first.weight.dtype)
    sd.update({"linear_2.weight": eye, "linear_2.bias": torch.zeros(hidden, dtype=first.weight.dtype)})
    return sd, "linear"


def _eos_ids(tok) -> list[int]:
    """The ids vlkit's ``VLM.generate`` stops at (the tokenizer's EOS and ``<|im_end|>`` when it exists)."""
    ids = []
    for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
        if isinstance(i, int) and i >= 0 and i not in ids and i != tok.unk_token_id:
            ids.append(i)
    return ids


def _processor_chat_template(tok, image_token: str) -> str | None:
    """The LLM's chat template, accepting ``[{"type": "image"}, {"type": "text", ...}]`` contents.

    If the template already renders list contents (an image part as the image token) it is used as is;
    otherwise list contents are turned into strings first (image part -> ``<image>\\n``, text parts as they are,
    the LLaVA convention of the training data) and the template is used on those.
    """
    tmpl = getattr(tok, "chat_template", None)
    if not isinstance(tmpl, str):
        return tmpl
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "zq probe"}]}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        if image_token in text and "zq probe" in text:
            return tmpl
    except Exception:  # noqa: BLE001 - any template failure means: normalise contents first
        pass
    img = image_token.replace("\\", "\\\\").replace("'", "\\'")
    prelude = (
        "{%- set _vl = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m.content is string or m.content is none -%}{%- set _vl.msgs = _vl.msgs + [m] -%}"
        "{%- else -%}{%- set _c = namespace(s='') -%}"
        "{%- for p in m.content -%}"
        "{%- if p.type == 'image' -%}{%- set _c.s = _c.s + '" + img + "\\n' -%}"
        "{%- elif p.type == 'text' -%}{%- set _c.s = _c.s + p.text -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _vl.msgs = _vl.msgs + [{'role': m.role, 'content': _c.s}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _vl.msgs -%}"
    )
    return prelude + tmpl


def _target_dtype(model, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return next(model.llm.base().parameters()).dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    return DTYPES[dtype]


def _write_hf_llava(model, recipe, run_dir: Path, out: Path, used: dict[str, str], dtype: str | None) -> dict[str, Any]:
    """Merge LoRA, describe the model as a LlavaConfig, assemble and save the HF model, then its processor."""
    enc, llm = model.encoder, model.llm
    # LoRA merged into the LLM's weights (the loaded model is ours to change)
    lora = hasattr(llm.model, "merge_and_unload")
    if lora:
        llm.model = llm.model.merge_and_unload()
    target = _target_dtype(model, dtype)
    config, proj_sd = _llava_config(model)
    hf = _assemble(model, config, proj_sd, target)
    hf.generation_config = _generation_config(llm.base(), llm.tokenizer)
    hf.save_pretrained(out, safe_serialization=True)
    _save_processor(model, config.vision_feature_select_strategy, out)
    return {
        "format": "hf-llava", "export_version": EXPORT_VERSION, "vlkit_version": __version__,
        "source_run": str(run_dir.resolve()), "recipe": recipe.name, "identity": recipe.identity(),
        "stages": used, "complete": complete(recipe, used), "lora_merged": lora,
        "num_image_tokens": model.num_image_tokens, "image_token": llm.image_token,
        "image_token_id": int(model.image_token_id), "vision_feature_layer": int(config.vision_feature_layer),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector_hidden_act, "dtype": str(target).split(".")[-1],
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def _llava_config(model) -> tuple[LlavaConfig, dict[str, torch.Tensor]]:
    """The LlavaConfig of the model (text and vision configs, feature layer and selection, projector activation)
    and the projector's weights under HF Llava's names."""
    enc, lm = model.encoder, model.llm.base()
    head = lm.get_output_embeddings()
    text_config = copy.deepcopy(lm.config)
    text_config.vocab_size = int(lm.get_input_embeddings().num_embeddings)
    text_config._name_or_path = ""  # no local paths of the build machine in the export
    embed_w = lm.get_input_embeddings().weight
    same = head.weight.shape == embed_w.shape and (head.weight.data_ptr() == embed_w.data_ptr()
                                                   or torch.equal(head.weight, embed_w))
    if getattr(text_config, "tie_word_embeddings", False) and not same:
        text_config.tie_word_embeddings = False  # e.g. LoRA on the embeddings or the head untied them
    vision_config = copy.deepcopy(enc.hf_model.config)
    vision_config._name_or_path = ""
    select = "default" if model.tokens.name == "patch" and bool(enc.has_cls) else "full"
    feature_layer = enc.layer if enc.layer < 0 else enc.layer + 1
    proj_sd, act = _projector_weights(model.projector, model.llm.hidden_size)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=int(model.image_token_id),
        image_seq_length=int(model.num_image_tokens), projector_hidden_act=act,
        vision_feature_select_strategy=select, vision_feature_layer=int(feature_layer),
        multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    return config, proj_sd


def _assemble(model, config: LlavaConfig, proj_sd: dict[str, torch.Tensor],
              target: torch.dtype) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration holding the model's weights in ``target`` dtype, built on the meta device
    (no second copy of the weights is initialised) and given ours."""
    enc, lm = model.encoder, model.llm.base()
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    if type(hf.model.language_model) is not type(decoder):
        raise ExportError(f"llm: AutoModel builds {type(hf.model.language_model).__name__} from the LLM's config but "
                          f"the LLM's decoder is {type(decoder).__name__}; HF Llava cannot hold it")
    if type(hf.model.vision_tower) is not type(enc.hf_model):
        raise ExportError(f"encoder: AutoModel builds {type(hf.model.vision_tower).__name__} from the tower's "
                          f"config but the encoder is {type(enc.hf_model).__name__}")
    state: dict[str, torch.Tensor] = {}
    for prefix, sd in (("model.vision_tower.", enc.hf_model.state_dict()),
                       ("model.multi_modal_projector.", proj_sd),
                       ("model.language_model.", decoder.state_dict()),
                       ("lm_head.", head.state_dict())):
        for k, v in sd.items():
            state[prefix + k] = v.detach().to("cpu", target)  # no copy when already there: saved, not changed
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ExportError(f"weights do not fit LlavaForConditionalGeneration (missing {missing[:5]}, "
                          f"unexpected {extra[:5]})")
    hf.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    # non-persistent buffers (position ids, rotary frequencies) are rebuilt from the config on load; give the
    # in-memory copy real ones so that saving never touches a meta tensor
    for mod_name, mod in hf.named_modules():
        for b_name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[b_name] = _find_buffer(mod_name, b_name, enc.hf_model, decoder)
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.config.dtype = target
    return hf


def _generation_config(lm, tok) -> GenerationConfig:
    """The LLM's generation config with the tokenizer's end-of-turn, pad and bos ids."""
    eos = _eos_ids(tok)
    gen = GenerationConfig.from_model_config(lm.config) if lm.generation_config is None else \
        copy.deepcopy(lm.generation_config)
    gen.eos_token_id = eos if len(eos) != 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else gen.bos_token_id
    return gen


def _save_processor(model, select: str, out: Path) -> None:
    """LlavaProcessor: the encoder's preprocessing as a CLIPImageProcessor, the tokenizer and chat template; checked
    to expand ``<image>`` to the model's number of image tokens."""
    enc, llm = model.encoder, model.llm
    has_cls = bool(enc.has_cls)
    size = int(enc.image_size)
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(enc.mean), image_std=list(enc.std), do_convert_rgb=True,
    )
    patch = int(getattr(enc.hf_model.config, "patch_size"))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=llm.tokenizer, patch_size=patch,
        vision_feature_select_strategy=select, chat_template=_processor_chat_template(llm.tokenizer, llm.image_token),
        image_token=llm.image_token, num_additional_image_tokens=1 if has_cls else 0,
    )
    processor.save_pretrained(out)
    n_check = (size // patch) ** 2 + (1 if has_cls else 0) - (1 if select == "default" else 0)
    if n_check != model.num_image_tokens:
        raise ExportError(f"the processor would expand <image> to {n_check} tokens but the model makes "
                          f"{model.num_image_tokens}")


def _find_buffer(hf_name: str, b_name: str, tower: nn.Module, decoder: nn.Module) -> torch.Tensor:
    """The vlkit model's copy of a non-persistent buffer of the assembled HF model."""
    for prefix, src_root in (("model.vision_tower", tower), ("model.language_model", decoder)):
        if hf_name == prefix or hf_name.startswith(prefix + "."):
            sub = hf_name[len(prefix) + 1:]
            src_mod = src_root.get_submodule(sub) if sub else src_root
            buf = src_mod._buffers.get(b_name)
            if buf is not None:
                return buf.detach().cpu().clone()
    raise ExportError(f"no source for buffer {hf_name}.{b_name} of the assembled LlavaForConditionalGeneration")
