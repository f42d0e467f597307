"""`vlkit export`: the hf-llava export gives vlkit's logits and greedy tokens through transformers' own
LlavaForConditionalGeneration + AutoProcessor; the vlkit format round-trips any model; what HF Llava cannot
express is refused with the part and the reason."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from vlkit.cli import app
from vlkit.export import ExportError, check_hf_llava, export_run, hf_llava_problems, load_export, load_model

TOL = 1e-4
# without the default's cell names and output norm: HF Llava has neither (test_cell_markers checks that export
# refuses the names, test_hf_llava_problems_name_the_part the norm)
HF_OK = ["fusion.cells=null", "tokens.name=patch", "projector.out_norm=null"]
ONE_STEP = [*HF_OK, "stages.align.max_steps=1", "stages.align.batch_size=2",
            "stages.instruct.max_steps=1",
            "stages.instruct.batch_size=2", "stages.align.eval_data=null", "stages.instruct.eval_data=null"]


@pytest.fixture(scope="module")
def trained_run(tiny_toy_world, tmp_path_factory) -> Path:
    """align (projector) then instruct (projector + LoRA), one step each: enough for non-zero LoRA deltas."""
    from vlkit.config import load_recipe
    from vlkit.train import train

    run = tmp_path_factory.mktemp("export") / "run"
    train(load_recipe("mlp_patch", ONE_STEP), run, console=Console(quiet=True))
    return run


def fake_run(run: Path, overrides: list[str]) -> Path:
    """A one-stage run directory without training: the freshly built (random) projector is its checkpoint."""
    from vlkit.checkpoint import save_checkpoint
    from vlkit.config import dump_recipe, load_recipe
    from vlkit.model import build_model

    recipe = load_recipe("mlp_patch", [*HF_OK, *overrides, "train.stages=[align]"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(recipe))
    torch.manual_seed(1)
    model = build_model(recipe)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    save_checkpoint(run / "checkpoints" / "align" / "final", model, None, {"stage": "align", "step": 1})
    return run


def toy_record(world) -> tuple[dict, Image.Image]:
    from vlkit.data.llava import load_image

    rec = next(r for r in json.loads((world.data_dir / "instruct_val.json").read_text()) if r.get("image"))
    return rec, load_image(world.data_dir / "images" / rec["image"])


def vlkit_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    # [1, T] ids (image already expanded) -> [1, T, V] logits at every position, through vlkit's own path
    with torch.no_grad():
        embeds = model.embed_inputs(input_ids, model.encode_images(pixel_values))
        mask = torch.ones_like(input_ids)
        hidden = model.llm.hidden_states(embeds, mask, (mask.cumsum(-1) - 1))
        return model.llm.logits(hidden).float()


def hf_inputs(processor, question: str, image: Image.Image) -> tuple[str, dict]:
    text = question.replace("<image>", "").lstrip("\n")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + text}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt, processor(images=image, text=prompt, return_tensors="pt")


def test_hf_llava_export_matches_vlkit(trained_run, tiny_toy_world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlkit.data.llava import ImageTransform
    from vlkit.evaluate import prompt_example
    from vlkit.predict import load_run

    lora = load_file(str(trained_run / "checkpoints/instruct/final/trainable.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # the merge has something to merge

    out = tmp_path / "hf"
    res = CliRunner().invoke(app, ["export", str(trained_run), str(out), "--format", "hf-llava"])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "export.json").read_text())
    assert info["lora_merged"] and info["vision_feature_select_strategy"] == "default"
    assert info["vision_feature_layer"] == -2 and info["num_image_tokens"] == 64

    model, _, _ = load_run(trained_run)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert hf.config.image_token_id == model.image_token_id and hf.config.image_seq_length == 64

    rec, image = toy_record(tiny_toy_world)
    prompt, inputs = hf_inputs(processor, rec["conversations"][0]["value"], image)
    example, _ = prompt_example(rec, model.tokenizer, model.image_token_id, model.num_image_tokens)
    assert inputs["input_ids"][0].tolist() == example.input_ids  # same template, same image-token expansion
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    assert (inputs["pixel_values"] - transform(image)[None]).abs().max() < 1e-5
    odd = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8))
    assert (processor.image_processor(odd, return_tensors="pt")["pixel_values"]
            - transform(odd)[None]).abs().max() < 1e-5  # resize shortest side (bicubic) + centre crop, as vlkit

    ids = inputs["input_ids"]
    ours = vlkit_logits(model, ids, inputs["pixel_values"])
    with torch.no_grad():
        theirs = hf(**inputs).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"hf-llava vs vlkit: max |logit diff| = {diff:.2e} over {ids.shape[1]} positions")
    assert ours.shape == theirs.shape and diff <= TOL
    other = vlkit_logits(model, ids, torch.flip(inputs["pixel_values"], dims=[-1]))
    assert (other - ours).abs().max() > 100 * TOL  # the image matters, so the comparison means something

    mine = model.generate(ids, torch.ones_like(ids), pixel_values=inputs["pixel_values"], max_new_tokens=8)
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert gen[0, ids.shape[1]:].tolist() == mine[0].tolist()


def test_vlkit_format_round_trip(trained_run, tmp_path):
    from vlkit.predict import load_run

    out = tmp_path / "vl"
    info = export_run(trained_run, out, format="vlkit")
    assert {p.name for p in out.iterdir()} == {"config.yaml", "model.safetensors", "export.json"}
    assert info["lora_stage"] == "align" and info["complete"] and info["stages"] == {"align": "final",
                                                                                       "instruct": "final"}
    ref, _, _ = load_run(trained_run)
    back, recipe, _ = load_export(out)
    assert recipe.name == "mlp_patch" and load_model(out)[0].num_image_tokens == ref.num_image_tokens
    torch.manual_seed(0)
    ids = torch.randint(10, 100, (2, 80))
    ids[:, 5:5 + ref.num_image_tokens] = ref.image_token_id
    pv = torch.randn(2, 3, 64, 64)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = ref(ids, mask, ids, pixel_values=pv, return_logits=True).logits
        b = back(ids, mask, ids, pixel_values=pv, return_logits=True).logits
    assert torch.equal(a, b)
    with pytest.raises(ExportError, match="not empty"):
        export_run(trained_run, out, format="vlkit")


def test_linear_projector_and_cls_patch_export_exactly(tiny_toy_world, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlkit.predict import load_run

    run = fake_run(tmp_path / "run", ["projector.name=linear", "tokens.name=cls_patch", "encoder.layer=1"])
    info = export_run(run, tmp_path / "hf", format="hf-llava")
    # one linear map = linear_1, identity activation, identity linear_2; CLS + patches = "full"; block 1 = hs[2]
    assert (info["projector_hidden_act"], info["vision_feature_select_strategy"], info["vision_feature_layer"]) == \
        ("linear", "full", 2)
    model, _, _ = load_run(run)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    rec, image = toy_record(tiny_toy_world)
    _, inputs = hf_inputs(processor, rec["conversations"][0]["value"], image)
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens == 65
    with torch.no_grad():
        theirs = hf(**inputs).logits.float()
    assert (vlkit_logits(model, inputs["input_ids"], inputs["pixel_values"]) - theirs).abs().max() <= TOL


def test_inexpressible_combinations_are_refused(tiny_toy_world, tmp_path):
    from vlkit.config import dump_recipe, load_recipe
    from vlkit.model import build_model

    # through the CLI, before any weight is loaded: names the part and the way out
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_recipe(load_recipe("mlp_patch", ["projector.name=cross_attention",
                                                                           "projector.num_tokens=4"])))
    res = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "out"), "--format", "hf-llava"])
    assert res.exit_code == 1
    assert "projector 'cross_attention'" in res.output and "--format vlkit" in res.output
    assert not (tmp_path / "out").exists()

    cases = {
        ("tokens.name=pooled", "tokens.num_tokens=4"): "tokens 'pooled'",
        ("tokens.name=cls",): "tokens 'cls'",
        ("projector.name=cls_reshape", "projector.num_tokens=4", "tokens.name=cls"): "projector 'cls_reshape'",
        ("projector.depth=3",): "depth 3",
        ("encoder.name=timm_vit", "encoder.model=vit_tiny_patch16_224"): "encoder 'timm_vit'",
        ("fusion.name=xattn",): "fusion 'xattn'",
        ("projector.out_norm=text",): "projector.out_norm 'text'",
    }
    for overrides, part in cases.items():
        problems = hf_llava_problems(load_recipe("mlp_patch", list(overrides)))
        assert any(part in p for p in problems), (overrides, problems)
    assert hf_llava_problems(load_recipe("mlp_patch", HF_OK)) == []
    normed = load_recipe("mlp_patch", [*HF_OK, "projector.out_norm=text"])
    with pytest.raises(ExportError, match="no norm after linear_2"):  # the built model's check, too
        check_hf_llava(load_recipe("mlp_patch", HF_OK), build_model(normed))
    # linear_1 must map to the LLM's width
    wide = load_recipe("mlp_patch", [*HF_OK, "projector.hidden_dim=64"])
    with pytest.raises(ExportError, match="hidden_dim 64"):
        check_hf_llava(wide, build_model(wide))
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(run, tmp_path / "x", format="onnx")


def test_vlkit_format_exports_any_model(tiny_toy_world, tmp_path):
    from vlkit.predict import load_run

    run = fake_run(tmp_path / "run", ["projector.name=cross_attention", "projector.num_tokens=4"])
    export_run(run, tmp_path / "vl", format="vlkit")
    ref, _, _ = load_run(run)
    back, _, _ = load_export(tmp_path / "vl")
    pv = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert back.num_image_tokens == 4 and torch.equal(ref.encode_images(pv), back.encode_images(pv))
