"""The embedded default (tiny preset): offline build, loadable HF artefacts, chat template, determinism, probes."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from vlkit import toyworld as tw


def test_layout_and_marker(tiny_toy_world):
    w = tiny_toy_world
    for d in (w.data_dir, w.tokenizer_dir, w.clip_dir, w.lm_dir):
        assert d.is_dir()
    assert (w.data_dir / "instruct_val.json").is_file() and (w.data_dir / "images" / "train").is_dir()
    marker = json.loads((w.root / "build.json").read_text())
    assert marker["hash"] == tw.config_hash(tw.build_config(0, "tiny"))
    assert tw.is_built(w.root, 0, "tiny") and not tw.is_built(w.root, 1, "tiny")
    assert not [p for p in w.root.parent.iterdir() if ".building-" in p.name]


def test_second_build_is_a_cache_hit(tiny_toy_world):
    before = (tiny_toy_world.root / "build.json").stat().st_mtime_ns
    t = time.perf_counter()
    again = tw.build_toy_world(tiny_toy_world.root, preset="tiny")
    assert time.perf_counter() - t < 5
    assert (again.root / "build.json").stat().st_mtime_ns == before
    assert again.report == tiny_toy_world.report


def test_tokenizer_chat_template(tiny_toy_world):
    from transformers import AutoTokenizer

    for d in (tiny_toy_world.tokenizer_dir, tiny_toy_world.lm_dir):
        tok = AutoTokenizer.from_pretrained(d)
        msgs = [{"role": "user", "content": "<image>\nWhat colour is the object in the top left?"},
                {"role": "assistant", "content": "red"}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\n<image>\nWhat colour is the object in the top left?<|im_end|>\n"
                        "<|im_start|>assistant\nred<|im_end|>\n")
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
        enc = tok.apply_chat_template(msgs, tokenize=True)  # transformers 5: a BatchEncoding
        ids = enc["input_ids"]
        assert tok.decode(ids) == text
        for special in ("<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
        assert tok.pad_token == tok.eos_token == "<|endoftext|>"
        # the assistant mask covers exactly the answer and its end-of-turn token
        masked = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        kept = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
        assert tok.decode(kept) == "red<|im_end|>"
        system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *msgs], tokenize=False)
        assert system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "helpful" not in system


def test_clip_loads_as_vision_tower(tiny_toy_world):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(tiny_toy_world.clip_dir).eval()
    assert vision.config.image_size == 64 and vision.config.patch_size == 8
    proc = CLIPImageProcessor.from_pretrained(tiny_toy_world.clip_dir)
    image = Image.open(tiny_toy_world.data_dir / "images" / "val" / "val_000000.png")
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    # the processor reproduces the normalisation used in training
    manual = tw._normalize(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None])
    assert torch.allclose(pixels, manual, atol=1e-4)
    with torch.no_grad():
        out = vision(pixel_values=pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 65, 128)
    assert len(out.hidden_states) == 5
    full = CLIPModel.from_pretrained(tiny_toy_world.clip_dir)
    assert full.config.text_config.vocab_size >= 100


def test_lm_loads_and_generates(tiny_toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_toy_world.lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_toy_world.lm_dir).eval()
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert lm.config.hidden_size == tw.LM_ARCH["hidden_size"] and lm.config.num_hidden_layers == tw.LM_ARCH["num_hidden_layers"]
    assert lm.config.vocab_size == len(tok)
    assert lm.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Scene: a red circle in the top left. "
                                       "How many objects are there?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_report_has_probes(tiny_toy_world):
    r = tiny_toy_world.report
    assert json.loads((tiny_toy_world.root / "report.json").read_text()) == r
    assert set(r["build_seconds"]) >= {"data", "tokenizer", "toy-clip", "toy-lm", "toy-clip probes", "toy-lm probes",
                                       "total"}
    if r["parallel_jobs"]:  # each job's own process reports its peak memory (the README's build figure)
        assert set(r["job_peak_rss_mb"]) == {"toy-clip", "toy-lm"}
        assert all(50 < mb < 24 * 1024 for mb in r["job_peak_rss_mb"].values()), r["job_peak_rss_mb"]
    lm = r["toy_lm"]
    assert 1.0 < lm["val_perplexity"] < 50  # far below uniform over the vocabulary
    assert lm["train_loss_last"] < lm["train_loss_first"]
    assert 0.0 <= r["toy_clip"]["retrieval_top1_batch100"] <= 1.0
    probes = r["linear_probes"]
    # where objects are lives in the patch tokens, not in the pooled CLS (ANCHORS.md)
    assert probes["position"]["patch_cells"]["exact"] > probes["position"]["cls"]["exact"] + 0.2
    assert probes["position"]["patch_cells"]["per_label"] > 0.85
    assert probes["colour"]["cls"]["per_label"] > probes["colour"]["majority"]["per_label"]
    per_object = probes["per_object"]
    assert per_object["colour"]["cell_mean"] > per_object["colour"]["majority"] + 0.3
    assert set(per_object["shape"]) == {"majority", "cell_mean", "patch_window_3x3"}


def test_same_seed_same_weights(tiny_toy_world, tmp_path):
    """Retrain toy-clip and toy-lm from the same seed: every tensor is bit-identical."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = tw.build_config(0, "tiny")
    tok = AutoTokenizer.from_pretrained(tiny_toy_world.tokenizer_dir)
    with tw._quiet_runtime(tw.build_threads()):
        tw.train_clip(tiny_toy_world.data_dir, tok, tmp_path / "clip", cfg, lambda *a: None)
        tw.train_lm(tok, tmp_path / "lm", cfg, lambda *a: None)
    for new, old in ((tmp_path / "clip", tiny_toy_world.clip_dir), (tmp_path / "lm", tiny_toy_world.lm_dir)):
        a, b = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # the tokenizer is a pure function of the data as well
    assert tw.build_tokenizer(tiny_toy_world.data_dir).get_vocab() == tok.get_vocab()


def test_resolve_toy(tiny_toy_world, monkeypatch):
    monkeypatch.setenv(tw.ENV_DIR, str(tiny_toy_world.root))
    monkeypatch.setenv(tw.ENV_PRESET, "tiny")
    assert tw.toy_cache_dir() == tiny_toy_world.root
    assert tw.resolve_toy("toy:clip") == str(tiny_toy_world.clip_dir)
    assert tw.resolve_toy("toy:lm") == str(tiny_toy_world.lm_dir)
    assert tw.resolve_toy("toy:tokenizer") == str(tiny_toy_world.tokenizer_dir)
    assert tw.resolve_toy("toy:data") == str(tiny_toy_world.data_dir)
    assert tw.resolve_toy("toy:data/images") == str(tiny_toy_world.data_dir / "images")
    assert tw.resolve_toy("toy:data/align_train.json") == str(tiny_toy_world.data_dir / "align_train.json")
    assert tw.resolve_toy("/some/local/dir") == "/some/local/dir"
    assert tw.resolve_toy("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    with pytest.raises(ValueError, match="toy:clip"):
        tw.resolve_toy("toy:vit")
    with pytest.raises(ValueError, match="unknown toy world reference"):
        tw.resolve_toy("toy:clip/extra")
    with pytest.raises(ValueError, match="preset"):
        tw.build_config(0, "huge")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(tw.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tw.toy_cache_dir()
    assert root.name == f"toyworld-v{tw.WORLD_VERSION}" and "vlkit" in root.parts
    assert tw.toy_cache_dir("tiny").name == f"toyworld-v{tw.WORLD_VERSION}-tiny"
