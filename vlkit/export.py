"""Export a trained run: ``vlkit`` format (any model) or a Hugging Face ``LlavaForConditionalGeneration``.

``vlkit`` format (``format="vlkit"``) -- works for every recipe::

    OUT/config.yaml        the run's resolved recipe
    OUT/model.safetensors  every parameter some finished stage trained (projector, LoRA adapters as adapters,
                           unfrozen encoder blocks, full-LLM weights), final values, named as in the loaded model
    OUT/export.json        format, source run, stages and checkpoints used, LoRA stage, image tokens

Base weights are not copied: the encoder and LLM are rebuilt from the recipe's model references (hub ids, local
dirs, ``toy:`` paths), exactly as :func:`vlkit.runs.load_run` does. :func:`load_export` loads it back (same model,
identical logits); :func:`load_model` takes either a run directory or a vlkit export.

``hf-llava`` format (``format="hf-llava"``) -- a self-contained ``LlavaForConditionalGeneration`` directory
(config, safetensors weights, generation config, tokenizer with the image token, ``LlavaProcessor`` with a
``CLIPImageProcessor`` and chat template) for the combinations HF Llava can express:

* encoder ``hf_clip`` / ``hf_siglip`` (built-in): ``vision_tower`` = the encoder's ``hf_model`` (trained blocks
  included); ``vision_feature_layer`` = the encoder's ``layer`` as a ``hidden_states`` index (negative layers
  unchanged, block ``k >= 0`` -> ``k + 1``);
* tokens ``patch`` (CLIP: ``vision_feature_select_strategy="default"``, drops the CLS token; SigLIP has no CLS
  token so ``"full"``) or ``cls_patch`` (CLIP only: ``"full"``);
* projector ``mlp`` with depth 2 and hidden size = the LLM's hidden size -> ``linear_1``, GELU, ``linear_2``;
  projector ``linear`` (or ``mlp`` depth 1) is expressed exactly as ``linear_1`` = the projector,
  ``projector_hidden_act="linear"`` (identity), ``linear_2`` = identity matrix with zero bias (costs one extra
  ``H x H`` matrix; the outputs are the same numbers);
* LLM: any built-in ``hf`` causal LM whose decoder is what ``AutoModel`` builds from its config and whose LM head
  has no bias; LoRA adapters are merged (``merge_and_unload``).

Everything else (timm / open_clip / plugin encoders, ``cls`` / ``pooled`` tokens, ``cross_attention`` /
``cls_reshape`` / deeper MLP / plugin projectors, non-prefix fusion) raises :class:`ExportError` naming the part
and the reason; use ``format="vlkit"`` for those.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)

from vlkit import __version__
from vlkit.checkpoint import load_trainable
from vlkit.components.encoders import HFVisionEncoder
from vlkit.components.llms import HFCausalLM
from vlkit.components.projectors import LinearProjector, MLPProjector
from vlkit.components.tokens import ClsPatchTokens, PatchTokens
from vlkit.config import dump_recipe, load_recipe
from vlkit.model import build_model
from vlkit.registry import ENCODERS, LLMS, PROJECTORS, TOKEN_STRATEGIES
from vlkit.runs import attach_lora, load_run, load_run_tracked, pick_device

FORMATS = ("hf-llava", "vlkit")
EXPORT_VERSION = 1
HF_ENCODERS = ("hf_clip", "hf_siglip")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A run cannot be exported in the requested format; the message names the part and why."""


def _complete(recipe, used: dict[str, str]) -> bool:
    return all(used.get(s) == "final" for s in recipe.train.stages)


# =================================================================================================================
# vlkit format
# =================================================================================================================
def _write_vlkit(model, recipe, run_dir: Path, out: Path, used: dict[str, str], lora_stage: str | None,
                 touched: set[int]) -> dict[str, Any]:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if id(p) in touched}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "vlkit_export": "vlkit"})
    (out / "config.yaml").write_text(dump_recipe(recipe))
    info = {
        "format": "vlkit", "export_version": EXPORT_VERSION, "vlkit_version": __version__,
        "source_run": str(run_dir.resolve()), "recipe": recipe.name, "identity": recipe.identity(),
        "stages": used, "complete": _complete(recipe, used), "lora_stage": lora_stage,
        "num_image_tokens": model.num_image_tokens, "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "note": "base encoder/LLM weights are rebuilt from the recipe's model references",
    }
    return info


def load_export(path: str | Path, device: str | torch.device | None = None):
    """A ``vlkit``-format export as ``(model, recipe, device)``, like :func:`vlkit.runs.load_run`."""
    path = Path(path)
    info = read_export_info(path)
    if info.get("format") != "vlkit":
        raise ExportError(f"{path} is a '{info.get('format')}' export; only 'vlkit' exports load into vlkit "
                          "(load an hf-llava export with transformers' LlavaForConditionalGeneration)")
    recipe = load_recipe(path / "config.yaml")
    dev = torch.device(device) if device is not None else pick_device(recipe.train.device)
    model = build_model(recipe)
    if info.get("lora_stage"):
        attach_lora(model, recipe.stages[info["lora_stage"]])
    load_trainable(model, path / "model.safetensors")
    return model.to(dev).eval(), recipe, dev


def read_export_info(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "export.json"
    if not p.exists():
        raise FileNotFoundError(f"{path} is not a vlkit export (no export.json)")
    return json.loads(p.read_text())


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").exists()


def load_model(path: str | Path):
    """A run directory or a ``vlkit``-format export as ``(model, recipe, device)`` (for ``predict`` / ``eval``)."""
    if is_export(path):
        return load_export(path)
    return load_run(path)


# =================================================================================================================
# hf-llava format: what it can express
# =================================================================================================================
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
                        "patches ('full'); it cannot take a single CLS/pooled token or pool the patch grid; only "
                        "patch / cls_patch export")
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
    fusion = recipe.fusion.name
    if fusion != "prefix":
        problems.append(f"fusion '{fusion}': HF Llava only splices the image embeddings into the text sequence "
                        "(prefix fusion); it has no cross-attention or other fusion layers")
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


# =================================================================================================================
# hf-llava format: building it
# =================================================================================================================
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
    enc, llm = model.encoder, model.llm
    # LoRA merged into the LLM's weights (the loaded model is ours to change)
    lora = hasattr(llm.model, "merge_and_unload")
    if lora:
        llm.model = llm.model.merge_and_unload()
    lm = llm.base()
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    hidden = llm.hidden_size
    target = _target_dtype(model, dtype)

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
    has_cls = bool(enc.has_cls)
    select = "default" if model.tokens.name == "patch" and has_cls else "full"
    feature_layer = enc.layer if enc.layer < 0 else enc.layer + 1
    proj_sd, act = _projector_weights(model.projector, hidden)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=int(model.image_token_id),
        image_seq_length=int(model.num_image_tokens), projector_hidden_act=act,
        vision_feature_select_strategy=select, vision_feature_layer=int(feature_layer),
        multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )

    # assemble without initialising a second copy of the weights: build on the meta device, assign ours
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
    tok = llm.tokenizer
    eos = _eos_ids(tok)
    gen = GenerationConfig.from_model_config(lm.config) if lm.generation_config is None else \
        copy.deepcopy(lm.generation_config)
    gen.eos_token_id = eos if len(eos) != 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else gen.bos_token_id
    hf.generation_config = gen
    hf.save_pretrained(out, safe_serialization=True)

    size = int(enc.image_size)
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(enc.mean), image_std=list(enc.std), do_convert_rgb=True,
    )
    patch = int(getattr(enc.hf_model.config, "patch_size"))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy=select, chat_template=_processor_chat_template(tok, llm.image_token),
        image_token=llm.image_token, num_additional_image_tokens=1 if has_cls else 0,
    )
    processor.save_pretrained(out)
    n_check = (size // patch) ** 2 + (1 if has_cls else 0) - (1 if select == "default" else 0)
    if n_check != model.num_image_tokens:
        raise ExportError(f"the processor would expand <image> to {n_check} tokens but the model makes "
                          f"{model.num_image_tokens}")
    return {
        "format": "hf-llava", "export_version": EXPORT_VERSION, "vlkit_version": __version__,
        "source_run": str(run_dir.resolve()), "recipe": recipe.name, "identity": recipe.identity(),
        "stages": used, "complete": _complete(recipe, used), "lora_merged": lora,
        "num_image_tokens": model.num_image_tokens, "image_token": llm.image_token,
        "image_token_id": int(model.image_token_id), "vision_feature_layer": int(feature_layer),
        "vision_feature_select_strategy": select, "projector_hidden_act": act, "dtype": str(target).split(".")[-1],
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


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


# =================================================================================================================
# entry point
# =================================================================================================================
def export_run(run_dir: str | Path, out: str | Path, format: str = "hf-llava", dtype: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Export the run in ``run_dir`` to the new directory ``out``; returns what ``export.json`` records.

    The directory is assembled beside ``out`` and moved into place at the end, so a failed export leaves nothing.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; valid: {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"{out} is inside the run directory {run_dir}; export somewhere else")
    if format == "hf-llava":
        cfg = run_dir / "config.yaml"
        if not cfg.exists():
            raise FileNotFoundError(f"{run_dir} is not a vlkit run directory (no config.yaml)")
        check_hf_llava(load_recipe(cfg))  # before loading any weights
    loaded = load_run_tracked(run_dir)
    model, recipe, used = loaded.model, loaded.recipe, loaded.used
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            if format == "vlkit":
                info = _write_vlkit(model, recipe, run_dir, tmp, used, loaded.lora_stage, loaded.touched)
            else:
                check_hf_llava(recipe, model)
                info = _write_hf_llava(model, recipe, run_dir, tmp, used, dtype)
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
