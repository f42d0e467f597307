"""VLM assembly on the tiny toy world: splicing, masks, loss on supervised positions, text-only mixing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlkit.config import load_recipe
from vlkit.data.collate import Collator
from vlkit.data.llava import IGNORE, DataError, tokenize_record
from vlkit.model import build_model, count_image_tokens
from vlkit.toyworld import LM_ARCH


@pytest.fixture(scope="module")
def model(tiny_toy_world):
    torch.manual_seed(0)
    return build_model(load_recipe("mlp_patch", ["tokens.name=patch"]))  # all 64 patch tokens


def rec(image=True, turns=(("What colour?", "red"),)):
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if image and i == 0 else "") + q}, {"from": "gpt", "value": a}]
    out = {"id": "x", "conversations": conv}
    if image:
        out["image"] = "train/000000.png"
    return out


def test_labels_cover_every_assistant_turn_only(model):
    tok = model.tokenizer
    ex = tokenize_record(rec(turns=(("What colour is it?", "red"), ("And the shape?", "circle"))), tok,
                         model.image_token_id, model.num_image_tokens, 400)
    supervised = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert "red" in supervised and "circle" in supervised
    assert "colour" not in supervised and "shape" not in supervised and "system" not in supervised
    assert supervised.count("<|im_end|>") == 2  # each turn learns to stop
    img = [i for i, t in enumerate(ex.input_ids) if t == model.image_token_id]
    assert len(img) == model.num_image_tokens and all(ex.labels[i] == IGNORE for i in img)
    assert img == list(range(img[0], img[0] + len(img)))


def test_truncation_never_cuts_image(model):
    with pytest.raises(DataError, match="truncation would cut the image"):
        tokenize_record(rec(), model.tokenizer, model.image_token_id, model.num_image_tokens, 40)
    with pytest.raises(DataError, match="no supervised token"):
        tokenize_record(rec(), model.tokenizer, model.image_token_id, model.num_image_tokens,
                        model.num_image_tokens + 20)


def batch_of(model, records):
    examples = [tokenize_record(r, model.tokenizer, model.image_token_id, model.sequence_image_tokens, 400)
                for r in records]
    items = [{"input_ids": e.input_ids, "labels": e.labels, "index": i, "image_key": e.image,
              "pixel_values": torch.randn(3, 64, 64) if e.image else None} for i, e in enumerate(examples)]
    return Collator(model.tokenizer.pad_token_id)(items)


def test_splice_and_loss_match_full_logits(model):
    torch.manual_seed(1)
    b = batch_of(model, [rec(), rec(image=False, turns=(("Say hi", "hi there"),)), rec(turns=(("Q?", "a b c"),))])
    assert b["pixel_values"].shape[0] == 2  # the text-only sample brings no image
    out = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    # reference: splice by hand, full logits everywhere, standard shifted CE with ignore_index
    img = model.encode_images(b["pixel_values"])
    if model._order is not None:  # the recipe names cells (fusion.cells): its image tokens go in cell by cell
        img = img[:, model._order]
    emb = model.llm.embed_tokens(b["input_ids"].masked_fill(b["input_ids"] == model.image_token_id, 0))
    emb[b["input_ids"] == model.image_token_id] = img.reshape(-1, img.shape[-1])
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    logits = model.llm.model(inputs_embeds=emb, attention_mask=b["attention_mask"], position_ids=pos).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                          ignore_index=IGNORE)
    assert torch.allclose(out.loss, ref, atol=1e-5), (out.loss, ref)
    assert out.num_tokens == int((b["labels"][:, 1:] != IGNORE).sum())


def test_image_token_mismatch_is_an_error(model):
    b = batch_of(model, [rec()])
    with pytest.raises(ValueError, match="image tokens in the text"):
        model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("overrides,expected", [
    ([], 16), (["tokens.name=patch"], 64), (["tokens.name=cls"], 1), (["tokens.name=cls_patch"], 65), (["tokens.name=pooled", "tokens.num_tokens=4"], 4),
    (["projector.name=cross_attention", "projector.num_tokens=9"], 9),
    (["tokens.name=cls", "projector.name=cls_reshape", "projector.num_tokens=16"], 16),
])
def test_image_token_count_derived(tiny_toy_world, overrides, expected):
    assert count_image_tokens(load_recipe("mlp_patch", overrides)) == expected


def test_cls_reshape_on_patches_is_clear_error(tiny_toy_world):
    with pytest.raises(ValueError, match="cls_reshape' expects one input token"):
        count_image_tokens(load_recipe("mlp_patch", ["projector.name=cls_reshape", "projector.num_tokens=4"]))


def test_real_scale_recipe_builds_from_local_dirs(tiny_toy_world):
    """The Qwen2.5 + CLIP-L recipe's code path (hf_clip + hf llm by name) with local dirs in place of hub names."""
    r = load_recipe("llava15_qwen2.5-1.5b_clip-l336", [f"encoder.model={tiny_toy_world.clip_dir}",
                                                       f"llm.model={tiny_toy_world.lm_dir}", "llm.dtype=float32"])
    m = build_model(r)
    assert m.num_image_tokens == 64 and m.llm.hidden_size == LM_ARCH["hidden_size"]


def test_xattn_fusion_starts_as_the_frozen_llm_and_learns(tiny_toy_world):
    torch.manual_seed(0)
    m = build_model(load_recipe("mlp_patch", ["fusion.name=xattn", "fusion.every=2"]))
    assert m.sequence_image_tokens == 0 and m.num_image_tokens == 16 and len(m.fusion.blocks) == 2
    b = batch_of(m, [rec(), rec(image=False, turns=(("Say hi", "hi there"),))])
    assert not bool((b["input_ids"] == m.image_token_id).any())  # the image takes no sequence positions
    with_img = m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"],
                 image_index=b["image_index"])
    text_only = m(b["input_ids"], b["attention_mask"], b["labels"])
    assert torch.allclose(with_img.loss, text_only.loss, atol=1e-6)  # tanh(0) gates: LLM unchanged at init
    m.fusion.requires_grad_(True)
    with_img.loss.backward()
    assert m.fusion.blocks[0].attn_gate.grad is not None and float(m.fusion.blocks[0].attn_gate.grad.abs()) > 0


def test_out_norm_text_starts_image_tokens_at_the_llms_text_norm(tiny_toy_world):
    """projector.out_norm=text: every built-in projector's output tokens start at the LLM's mean text-embedding norm
    (vocabulary rows, recomputed here by a plain loop); without it the projector and its state dict are LLaVA's."""
    from vlkit.model import text_embedding_norm

    plain = build_model(load_recipe("mlp_patch", ["projector.out_norm=null"]))
    assert "out_norm" not in "".join(plain.projector.state_dict())  # checkpoints made before the option load as ever
    emb = plain.llm.model.get_input_embeddings().weight
    n = plain.llm.tokenizer.vocab_size
    expected = sum(float(emb[i].norm()) for i in range(n)) / n
    assert text_embedding_norm(plain.llm) == pytest.approx(expected, rel=1e-5)
    for proj in (["projector.name=mlp"], ["projector.name=linear"],
                 ["projector.name=cross_attention", "projector.num_tokens=9"]):
        torch.manual_seed(0)
        m = build_model(load_recipe("mlp_patch", [*proj, "projector.out_norm=text"]))
        out = m.projector(torch.randn(3, 16, _in_dim(m.projector)) * 7)
        norms = out.norm(dim=-1)
        tol = 0.05 if proj[0].endswith("cross_attention") else 1e-4  # a LayerNorm centres first
        assert torch.allclose(norms, torch.full_like(norms, expected), rtol=tol), proj


def _in_dim(projector: torch.nn.Module) -> int:
    return next(m for m in projector.modules() if isinstance(m, torch.nn.Linear)).in_features


def test_a_projector_without_out_norm_is_told_when_the_recipe_keeps_one(tiny_toy_world, monkeypatch):
    """A (plugin) projector whose factory has no out_norm: the default's out_norm 'text', kept across the swap, is an
    error naming the projector and the fix; with projector.out_norm=null it builds."""
    from vlkit.components.projectors import LinearProjector
    from vlkit.config import ConfigError, Recipe
    from vlkit.registry import PROJECTORS

    def plain_linear(in_dim: int, out_dim: int, num_tokens: int | None = None) -> torch.nn.Module:
        return LinearProjector(in_dim, out_dim)

    PROJECTORS._ensure_builtins()
    monkeypatch.setitem(PROJECTORS._builtins, "plain_linear", type(PROJECTORS._builtins["linear"])(
        "plain_linear", "built-in", factory=plain_linear))
    with pytest.raises(ConfigError, match=r"mlp_patch: projector.out_norm: projector 'plain_linear' \(built-in\) "
                                          r"takes no out_norm.*projector.out_norm='text'.*add projector.out_norm=null"):
        load_recipe("mlp_patch", ["projector.name=plain_linear"])
    # a recipe made in code skips load_recipe's checks: building it says the same
    data = load_recipe("mlp_patch", ["projector.name=plain_linear", "projector.out_norm=null"]).model_dump()
    data["projector"]["out_norm"] = "text"
    with pytest.raises(ValueError, match=r"projector 'plain_linear' \(built-in\) takes no out_norm"):
        build_model(Recipe.model_validate(data))
    m = build_model(load_recipe("mlp_patch", ["projector.name=plain_linear", "projector.out_norm=null"]))
    assert isinstance(m.projector, LinearProjector) and m.projector.out_norm is None


def test_out_norm_rejects_unknown_values_and_a_recipe_set_text_norm(tiny_toy_world):
    from vlkit.config import ConfigError

    with pytest.raises(ValueError, match="out_norm must be null .* or 'text'.*got 'txt'"):
        build_model(load_recipe("mlp_patch", ["projector.out_norm=txt"]))
    with pytest.raises(ConfigError, match="projector.text_norm: set by vlkit from the LLM's text-embedding norm"):
        load_recipe("mlp_patch", ["projector.text_norm=2.0"])


def test_preflight_prints_the_image_token_norm_from_cached_features_too(model):
    """The pre-flight's image_embed_norm (the diagnostic behind projector.out_norm) is printed with the feature cache
    on as well: projected from the cached encoder features, the same number as from the pixels."""
    import io

    from rich.console import Console

    from vlkit.train.data import preflight

    batch = batch_of(model, [rec(), rec(), rec(image=False)])
    was_training = model.training
    model.eval()  # the module's shared model: its mode is restored at the end
    from_pixels = preflight(model, batch, Console(file=io.StringIO()), model.tokenizer)
    cached = model.encoder_features(batch["pixel_values"])  # what the cache would hand back for these images
    out = io.StringIO()
    from_cache = preflight(model, {**batch, "pixel_values": None}, Console(file=out), model.tokenizer,
                           features_fn=lambda b: cached)
    assert from_cache["image_embed_norm"] == pytest.approx(from_pixels["image_embed_norm"], rel=1e-6)
    assert f"image_embed_norm={from_cache['image_embed_norm']:.3f}" in out.getvalue()
    assert "image_embed_norm" not in preflight(model, {**batch, "pixel_values": None}, Console(file=io.StringIO()),
                                                model.tokenizer)  # no pixels, no cache: nothing to measure
    model.train(was_training)
