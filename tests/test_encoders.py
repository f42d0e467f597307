"""Vision encoders: tiny random models saved to a temp dir and loaded back through the same code path a hub name /
pretrained tag takes (no network)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlkit.registry import ENCODERS, create_encoder
from vlkit.types import EncoderOutput

timm = pytest.importorskip("timm")
oc = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file

from vlkit.components.encoders import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TimmViTEncoder,
    VisionEncoder,
    resolve_layer,
)

OC_NAME = "vlkit-test-tiny-vit"
OC_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
PROC_MEAN = (0.1, 0.2, 0.3)
PROC_STD = (0.4, 0.5, 0.6)


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box thread contention makes small ops
    ~20x slower (timm weight init: 3 s instead of 0.1 s). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def art(tmp_path_factory, _one_thread):
    """Tiny random models (in memory) and their saved copies on disk."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    d: Path = tmp_path_factory.mktemp("encoders")
    a: dict = {"dir": d}

    # timm's own tiny test architectures keep the parametrised tests fast; the real names
    # (vit_tiny_patch16_224, convnext_atto) are covered by dedicated tests below.
    vit = timm.create_model("test_vit", img_size=32, num_classes=0).eval()
    a["vit"], a["vit_ckpt"] = vit, d / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(a["vit_ckpt"]))

    cnx = timm.create_model("test_convnext", num_classes=0).eval()
    a["cnx"], a["cnx_ckpt"] = cnx, d / "convnext.pth"
    torch.save(cnx.state_dict(), a["cnx_ckpt"])

    cfg_file = d / f"{OC_NAME}.json"
    cfg_file.write_text(json.dumps(OC_CFG))
    oc.add_model_config(cfg_file)
    ocm = oc.create_model(OC_NAME).eval()
    a["oc"], a["oc_ckpt"] = ocm, d / "open_clip.pt"
    torch.save(ocm.state_dict(), a["oc_ckpt"])

    clip_v = CLIPVisionModel(_clip_vision_config()).eval()
    a["clip"], a["clip_dir"] = clip_v, d / "clip_vision"
    clip_v.save_pretrained(a["clip_dir"])
    CLIPImageProcessor(
        image_mean=list(PROC_MEAN), image_std=list(PROC_STD), size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    ).save_pretrained(a["clip_dir"])

    full_cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "vocab_size": 64, "max_position_embeddings": 16},
        vision_config=_clip_vision_config().to_dict(), projection_dim=16,
    )
    clip_full = CLIPModel(full_cfg).eval()
    a["clip_full"], a["clip_full_dir"] = clip_full, d / "clip_full"
    clip_full.save_pretrained(a["clip_full_dir"])

    sig = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    )).eval()
    a["siglip"], a["siglip_dir"] = sig, d / "siglip"
    sig.save_pretrained(a["siglip_dir"])
    return a


# name -> (factory params given the artifacts, input side, expected (grid, embed_dim, has_cls))
CASES = {
    "timm_vit": (lambda a: {"model": "test_vit", "image_size": 32, "checkpoint_path": str(a["vit_ckpt"])},
                 32, ((2, 2), 64, True)),
    "timm_convnext": (lambda a: {"model": "test_convnext", "image_size": 64, "checkpoint_path": str(a["cnx_ckpt"])},
                      64, ((2, 2), 64, False)),
    "open_clip": (lambda a: {"model": OC_NAME, "pretrained": str(a["oc_ckpt"])}, 32, ((4, 4), 64, True)),
    "hf_clip": (lambda a: {"model": str(a["clip_dir"])}, 32, ((4, 4), 32, True)),
    "hf_siglip": (lambda a: {"model": str(a["siglip_dir"])}, 32, ((4, 4), 32, False)),
}


def _build(art, name, **over):
    params, side, _ = CASES[name]
    return create_encoder(name, **{**params(art), **over}), side


def _x(side, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, side, side, generator=g)


# ---- generic contract, every factory ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_contract_shapes_and_attributes(art, name):
    enc, side = _build(art, name)
    grid, dim, has_cls = CASES[name][2]
    assert isinstance(enc, VisionEncoder)
    assert (enc.grid, enc.embed_dim, enc.has_cls, enc.image_size) == (grid, dim, has_cls, side)
    assert enc.num_patches == grid[0] * grid[1]
    assert len(enc.mean) == 3 and len(enc.std) == 3 and all(isinstance(v, float) for v in enc.mean + enc.std)
    assert enc.layer == -1 and len(enc.blocks()) > 0
    out = enc(_x(side))
    assert isinstance(out, EncoderOutput)
    assert out.patches.shape == (2, enc.num_patches, dim)
    assert out.cls is not None and out.cls.shape == (2, dim)
    assert out.grid == grid
    assert torch.isfinite(out.patches).all()


@pytest.mark.parametrize("name", list(CASES))
def test_layer_selection_and_blocks(art, name):
    last, side = _build(art, name, layer=-1)
    pen, _ = _build(art, name, layer=-2)
    x = _x(side)
    a, b = last(x), pen(x)
    assert len(pen.blocks()) == len(last.blocks()) - 1
    if a.patches.shape == b.patches.shape:
        assert not torch.allclose(a.patches, b.patches)
    else:  # convnext: another stage, another grid and width
        assert pen.embed_dim != last.embed_dim and b.grid == pen.grid
    assert last.identity() != pen.identity()
    with pytest.raises(ValueError, match="out of range"):
        _build(art, name, layer=99)


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_by_default_and_stays_eval(art, name):
    enc, side = _build(art, name)
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    parent = torch.nn.Sequential(enc).train()
    assert parent.training and not enc.training
    out = enc(_x(side))
    assert not out.patches.requires_grad


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize("name", list(CASES))
def test_unfrozen_backward(art, name, layer):
    enc, side = _build(art, name, frozen=False, layer=layer)
    assert not enc.frozen and any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training
    out = enc(_x(side))
    (out.patches.pow(2).mean() + out.cls.pow(2).mean()).backward()
    # exactly the trainable parameters get gradients (what DDP without find_unused_parameters needs)
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but unused"
        else:
            assert p.grad is None
    assert all(p.requires_grad for b in enc.blocks() for p in b.parameters())
    enc.freeze()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_identity_stable_and_tracks_weights(art, name):
    enc, _ = _build(art, name)
    again, _ = _build(art, name)
    ident = enc.identity()
    assert ident == enc.identity() == again.identity()  # same weights, same key, across instances
    assert ident.startswith(f"{name}:") and ":layer-1:" in ident
    with torch.no_grad():
        next(iter(enc.parameters())).add_(1.0)
    changed = enc.identity()
    assert changed != ident and changed != again.identity()
    enc.load_state_dict(again.state_dict())
    assert enc.identity() == ident


@pytest.mark.parametrize("name", list(CASES))
def test_registry_signature(name):
    assert ENCODERS.check_params(name, {"layer": -2, "frozen": True}) == []
    errs = ENCODERS.check_params(name, {"layr": -2})
    assert errs and "layer" in errs[0]


# ---- timm -------------------------------------------------------------------------------------------------
def test_timm_vit_checkpoint_matches_in_memory(art):
    enc, _ = _build(art, "timm_vit")
    vit = art["vit"]
    x = _x(32)
    out = enc(x)
    with torch.no_grad():
        feats = vit.forward_features(x)  # [B, 1 + N, D], final norm applied
        ref_mem = TimmViTEncoder(vit, "test_vit")(x)
    torch.testing.assert_close(out.patches, feats[:, 1:])
    torch.testing.assert_close(out.cls, feats[:, 0])
    torch.testing.assert_close(out.patches, ref_mem.patches)


def test_timm_vit_penultimate_is_raw_block_output(art):
    enc, _ = _build(art, "timm_vit", layer=-2)
    vit = art["vit"]
    x = _x(32)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:-1]:
            h = blk(h)
    out = enc(x)
    torch.testing.assert_close(out.patches, h[:, 1:])
    torch.testing.assert_close(out.cls, h[:, 0])


def test_timm_vit_real_name_from_checkpoint(tmp_path):
    """vit_tiny_patch16_224 at 32 px, saved as .pth and loaded through the checkpoint_path (pretrained file) path."""
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    torch.save(net.state_dict(), tmp_path / "vit_tiny.pth")
    enc = create_encoder("timm_vit", model="vit_tiny_patch16_224", image_size=32,
                         checkpoint_path=str(tmp_path / "vit_tiny.pth"), layer=-2)
    assert (enc.embed_dim, enc.grid, enc.image_size, enc.has_cls) == (192, (2, 2), 32, True)
    assert enc.mean == (0.5, 0.5, 0.5)  # vit_tiny_patch16_224's pretrained_cfg (augreg)
    x = _x(32)
    torch.testing.assert_close(enc(x).patches, TimmViTEncoder(net, layer=-2)(x).patches)


def test_timm_vit_register_tokens_without_class_token(art):
    """test_vit3: no class token, 1 register token, attention-pool ('map') head."""
    enc = create_encoder("timm_vit", model="test_vit3", image_size=32)
    net = enc.model
    assert not enc.has_cls and enc.num_prefix_tokens == 1
    x = _x(32)
    out = enc(x)
    assert out.patches.shape == (2, 4, 96) and out.grid == (2, 2)
    with torch.no_grad():
        feats = net.forward_features(x)
        torch.testing.assert_close(out.patches, feats[:, 1:])  # register token dropped
        torch.testing.assert_close(out.cls, net.forward_head(feats, pre_logits=True))
    mid = TimmViTEncoder(net, "test_vit3", layer=-2)(x)
    torch.testing.assert_close(mid.cls, mid.patches.mean(1))


def test_timm_bad_checkpoint_is_an_error(art, tmp_path):
    sd = art["vit"].state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    with pytest.raises((ValueError, RuntimeError)):
        create_encoder("timm_vit", model="test_vit", image_size=32, checkpoint_path=str(bad))
    with pytest.raises(FileNotFoundError):
        create_encoder("timm_vit", model="test_vit", checkpoint_path=str(tmp_path / "nope.pth"))


def test_timm_convnext_stages_and_pooled_cls(art):
    enc, _ = _build(art, "timm_convnext")
    cnx = art["cnx"]
    x = _x(64)
    out = enc(x)
    with torch.no_grad():
        fmap = cnx.forward_features(x)
        torch.testing.assert_close(out.patches, fmap.flatten(2).transpose(1, 2))
        torch.testing.assert_close(out.cls, cnx.forward_head(fmap, pre_logits=True))
    s1, _ = _build(art, "timm_convnext", layer=1)
    o1 = s1(x)
    assert (s1.grid, s1.embed_dim, o1.patches.shape) == ((8, 8), 32, (2, 64, 32))
    torch.testing.assert_close(o1.cls, o1.patches.mean(1))


def test_timm_convnext_real_name_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "atto.safetensors"))
    enc = create_encoder("timm_convnext", model="convnext_atto", image_size=64,
                         checkpoint_path=str(tmp_path / "atto.safetensors"))
    assert (enc.embed_dim, enc.grid, enc.image_size, enc.has_cls) == (320, (2, 2), 64, False)
    assert enc.mean == (0.485, 0.456, 0.406)  # ImageNet, from convnext_atto's pretrained_cfg
    x = _x(64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).patches, net.forward_features(x).flatten(2).transpose(1, 2))
    assert create_encoder("timm_convnext", model="convnext_atto").image_size == 224  # pretrained_cfg default


# ---- open_clip --------------------------------------------------------------------------------------------
def test_open_clip_local_file_matches_in_memory(art):
    enc, _ = _build(art, "open_clip")
    visual = art["oc"].visual
    x = _x(32)
    out = enc(x)
    with torch.no_grad():
        pooled = visual(x)  # ln_post(CLS) @ proj
    torch.testing.assert_close(out.cls @ visual.proj, pooled)
    assert (enc.mean, enc.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert not hasattr(enc, "text")  # only the visual tower is kept


def test_open_clip_local_dir_schema(art, tmp_path):
    d = tmp_path / "oc_dir"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": OC_CFG, "preprocess_cfg": {"mean": list(PROC_MEAN), "std": list(PROC_STD)}}
    ))
    save_file({k: v.contiguous() for k, v in art["oc"].state_dict().items()}, str(d / "open_clip_model.safetensors"))
    enc = create_encoder("open_clip", model=f"local-dir:{d}")
    ref, _ = _build(art, "open_clip")
    x = _x(32)
    torch.testing.assert_close(enc(x).patches, ref(x).patches)
    assert enc.mean == PROC_MEAN and enc.std == PROC_STD


# ---- Hugging Face -----------------------------------------------------------------------------------------
def test_hf_clip_local_dir_matches_in_memory_and_llava_convention(art):
    x = _x(32)
    with torch.no_grad():
        ref = art["clip"](pixel_values=x, output_hidden_states=True)
    last, _ = _build(art, "hf_clip")
    pen, _ = _build(art, "hf_clip", layer=-2)
    torch.testing.assert_close(last(x).patches, ref.hidden_states[-1][:, 1:])
    torch.testing.assert_close(pen(x).patches, ref.hidden_states[-2][:, 1:])
    torch.testing.assert_close(pen(x).cls, ref.hidden_states[-2][:, 0])
    first, _ = _build(art, "hf_clip", layer=0)  # non-negative: block index -> hidden_states[k + 1]
    torch.testing.assert_close(first(x).patches, ref.hidden_states[1][:, 1:])
    assert last.mean == PROC_MEAN and last.std == PROC_STD  # from the saved CLIPImageProcessor
    assert type(last.hf_model).__name__ == "CLIPVisionModel"


def test_hf_clip_from_full_clip_model_dir(art):
    enc = create_encoder("hf_clip", model=str(art["clip_full_dir"]), layer=-2)
    x = _x(32)
    with torch.no_grad():
        ref = art["clip_full"].vision_model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(enc(x).patches, ref.hidden_states[-2][:, 1:])
    assert type(enc.hf_model).__name__ == "CLIPVisionModel"
    assert (enc.mean, enc.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # no processor saved: CLIP defaults


def test_hf_missing_weights_is_an_error(art, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "broken"
    art["clip"].config.save_pretrained(d)
    sd = load_file(str(art["clip_dir"] / "model.safetensors"))
    sd.pop(next(k for k in sd if "layers.0.self_attn.q_proj.weight" in k))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="uninitialised"):
        create_encoder("hf_clip", model=str(d))


def test_hf_siglip_pooled_cls(art):
    x = _x(32)
    with torch.no_grad():
        ref = art["siglip"](pixel_values=x, output_hidden_states=True)
    enc, _ = _build(art, "hf_siglip")
    out = enc(x)
    torch.testing.assert_close(out.patches, ref.hidden_states[-1])
    torch.testing.assert_close(out.cls, ref.pooler_output)
    assert (enc.mean, enc.std) == ((0.5,) * 3, (0.5,) * 3)
    mid = create_encoder("hf_siglip", model=str(art["siglip_dir"]), layer=-2)(x)
    torch.testing.assert_close(mid.cls, mid.patches.mean(1))


# ---- misc -------------------------------------------------------------------------------------------------
def test_resolve_layer():
    assert resolve_layer(-1, 12) == 11 and resolve_layer(-2, 12) == 10 and resolve_layer(0, 12) == 0
    with pytest.raises(ValueError):
        resolve_layer(-13, 12)
    with pytest.raises(TypeError):
        resolve_layer(True, 12)


def test_bad_input_shape(art):
    enc, _ = _build(art, "timm_vit")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.randn(3, 32, 32))


def test_module_import_is_lazy():
    code = (
        "import sys, vlkit.components.encoders, vlkit.registry as r; r.ENCODERS.names(); "
        "bad = [m for m in ('timm', 'open_clip', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
