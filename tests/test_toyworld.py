"""The embedded default: shipped weights checked on load, the tiny preset pretrained from scratch, HF artefacts,
chat template, determinism, probes."""
from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch

from vlkit import toyworld as tw
from vlkit.data.toy import OBJECT_TOKENS, QUESTION_TYPES
from vlkit.toyworld import shipped, world


# ---- the shipped weights --------------------------------------------------------------------------------------
def test_shipped_weights_load_offline():
    """The package's weights match their manifest, were made by this version's config, and load through HF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    manifest = tw.verify(tw.PACKAGE_WEIGHTS, tw.shipped_config_hash())
    assert manifest["config"] == tw.pretrain_config("default", 0)
    assert sum(f["bytes"] for f in manifest["files"].values()) <= 25 * 2**20  # the budget for weights in git
    for name in ("toy:clip", "toy:lm", "toy:tokenizer"):
        assert tw.resolve_toy(name).startswith(str(tw.PACKAGE_WEIGHTS)) or tw.env_preset() != "default"
    vision = CLIPVisionModel.from_pretrained(tw.PACKAGE_WEIGHTS / "toy-clip")
    assert vision.config.image_size == 64
    lm = AutoModelForCausalLM.from_pretrained(tw.PACKAGE_WEIGHTS / "toy-lm")
    tok = AutoTokenizer.from_pretrained(tw.PACKAGE_WEIGHTS / "toy-lm")
    assert lm.config.vocab_size == len(tok) and not lm.config.tie_word_embeddings
    report = manifest["report"]
    assert {"toy_lm", "toy_clip", "linear_probes", "seconds", "machine"} <= set(report)


@pytest.fixture
def weights_copy(tmp_path):
    dst = tmp_path / "weights"
    shutil.copytree(tw.PACKAGE_WEIGHTS, dst)
    return dst


def test_altered_weight_file_is_named(weights_copy):
    target = weights_copy / "toy-lm" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(tw.ToyWeightsError, match=r"toy-lm/model\.safetensors does not match its sha256"):
        tw.verify(weights_copy)


def test_truncated_and_missing_files_are_named(weights_copy):
    target = weights_copy / "toy-clip" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(tw.ToyWeightsError, match=r"toy-clip/model\.safetensors has 1000 bytes"):
        tw.verify(weights_copy)
    target.unlink()
    with pytest.raises(tw.ToyWeightsError, match=r"toy-clip/model\.safetensors is missing"):
        tw.verify(weights_copy)
    (weights_copy / "manifest.json").unlink()
    with pytest.raises(tw.ToyWeightsError, match="manifest.json is missing"):
        tw.verify(weights_copy)


def test_manifest_from_another_version(weights_copy):
    path = weights_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    with pytest.raises(tw.ToyWeightsError, match="expects 0123456789abcdef"):
        tw.verify(weights_copy, "0123456789abcdef")
    manifest["config"]["lm"]["steps"] += 1  # config edited without re-hashing
    path.write_text(json.dumps(manifest))
    with pytest.raises(tw.ToyWeightsError, match="does not match its hash"):
        tw.verify(weights_copy)
    path.write_text(json.dumps(manifest)[:200])
    with pytest.raises(tw.ToyWeightsError, match="unreadable"):
        tw.verify(weights_copy)


def test_damaged_package_weights_stop_the_cli(monkeypatch, weights_copy, tmp_path):
    """`vlkit toy build` on a damaged install: one clear line naming the file and the fix, no data written."""
    from typer.testing import CliRunner

    from vlkit.cli import app

    (weights_copy / "toy-lm" / "config.json").write_text("{}")
    monkeypatch.setattr(shipped, "PACKAGE_WEIGHTS", weights_copy)
    monkeypatch.setattr(world, "_VERIFIED", {})
    monkeypatch.setenv(tw.ENV_PRESET, "default")
    out = CliRunner().invoke(app, ["toy", "build", "--cache-dir", str(tmp_path / "world")])
    assert out.exit_code == 1
    assert "toy-lm/config.json" in out.output and "truncated or replaced" in out.output
    assert "vlkit toy pretrain" in out.output
    assert not (tmp_path / "world").exists()


def test_world_directory_named_by_config(monkeypatch, tmp_path):
    monkeypatch.delenv(tw.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tw.toy_cache_dir("default")
    assert root == tmp_path / "vlkit" / f"toyworld-{tw.world_id('default')}"
    assert tw.toy_cache_dir("tiny").name == f"toyworld-tiny-{tw.world_id('tiny')}"
    assert tw.world_id("default") == tw.shipped_config_hash()
    # an older world in the same place (a v2 marker) is not taken for this one
    root.mkdir(parents=True)
    (root / "build.json").write_text(json.dumps({"hash": "abc", "config": {"world_version": 2}}))
    assert not tw.is_built(root, "default")


# ---- the tiny preset, pretrained here --------------------------------------------------------------------------
def test_tiny_layout_and_marker(tiny_toy_world):
    w = tiny_toy_world
    for d in (w.data_dir, w.tokenizer_dir, w.clip_dir, w.lm_dir):
        assert d.is_dir()
    assert (w.data_dir / "instruct_val.json").is_file() and (w.data_dir / "images" / "train").is_dir()
    assert tw.is_built(w.root, "tiny") and not tw.is_built(w.root, "default")
    tw.verify(w.weights_dir, tw.world_id("tiny"))
    assert not [p for p in w.root.parent.iterdir() if ".building-" in p.name]


def test_second_build_is_a_cache_hit(tiny_toy_world):
    before = (tiny_toy_world.root / "build.json").stat().st_mtime_ns
    again = tw.build_toy_world(tiny_toy_world.root, preset="tiny")
    assert (again.root / "build.json").stat().st_mtime_ns == before
    assert again.report == tiny_toy_world.report


def test_two_tiny_pretrains_give_identical_hashes(tiny_toy_world, tmp_path):
    """Pretraining is a function of its config: every file of a second tiny pretrain hashes the same. It leaves
    the caller's RNG states alone (a world made on first use inside a run must not change the run)."""
    import random

    import torch

    torch.manual_seed(1)
    random.seed(1)
    before = (torch.get_rng_state(), random.getstate())
    again = tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    first = json.loads((tiny_toy_world.weights_dir / "manifest.json").read_text())
    assert again["files"] == first["files"]
    assert again["config_hash"] == first["config_hash"] == tw.world_id("tiny")



def test_an_interrupted_pretraining_resumes_to_the_same_weights(tiny_toy_world, tmp_path, monkeypatch):
    """A pretraining that dies mid-way leaves its checkpoints and no output; the same call resumes from them and
    writes the files a straight pretraining writes (same sha256), then removes its work directory. Checkpoints
    every 4 steps: toy-clip dies at step 6 (resumes at 4, its sampler's RNG restored), toy-lm at step 7 (toy-clip,
    finished by then, is kept), then toy-lm again at step 3 of its second stage (checkpoints every step; its
    first stage, finished by then, is kept)."""
    from vlkit.toyworld import models, pretraining

    monkeypatch.setenv("VLKIT_TOY_PARALLEL", "0")  # the jobs run in this process, where the failure is injected
    real_step, real_ckpt = models._step, pretraining._checkpoint

    def every_4(ckpt_dir, config, job):
        ckpt = real_ckpt(ckpt_dir, config, job)
        ckpt.every = 4
        return ckpt

    def dies_at_call(n):  # toy-clip's steps come first, then toy-lm's
        calls = []

        def step(*args):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_step(*args)
        return step

    monkeypatch.setattr(pretraining, "_checkpoint", every_4)
    tiny = tw.pretrain_config("tiny")
    clip_steps, lm_steps = tiny["clip"]["steps"], tiny["lm"]["steps"]
    work = tmp_path / f".weights.building-{tw.world_id('tiny')}"
    for dies_at, (job, done) in ((6, ("toy-clip", 4)), ((clip_steps - 4) + 7, ("toy-lm", 4)),
                                 ((lm_steps - 4) + 3, ("toy-lm/objects", 2))):
        monkeypatch.setattr(models, "_step", dies_at_call(dies_at))
        with pytest.raises(KeyboardInterrupt):
            tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir)
        assert not (tmp_path / "weights").exists()
        assert torch.load(work / "checkpoints" / job / "state.pt", weights_only=True)["step"] == done
    # the second call finished toy-clip before toy-lm died: its weights and result are kept, not trained again
    kept = work / "checkpoints" / "toy-clip.finished"
    assert (kept / "result.json").is_file() and (kept / "toy-clip" / "model.safetensors").is_file()
    # the third call finished toy-lm's first stage before its second died: kept too
    assert (work / "checkpoints" / "toy-lm" / "base.finished" / "toy-lm" / "model.safetensors").is_file()
    monkeypatch.setattr(models, "_step", real_step)
    again = tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir)
    first = json.loads((tiny_toy_world.weights_dir / "manifest.json").read_text())
    assert again["files"] == first["files"]
    assert again["report"]["toy_lm"]["first_stage"]["resumed_at_step"] == 4  # the run that finished it
    assert again["report"]["toy_lm"]["objects"]["resumed_at_step"] == 2
    assert again["report"]["toy_clip"]["resumed_at_step"] == 4  # the run that finished it, resumed at step 4
    assert not work.exists()


def test_job_keys_follow_what_each_job_depends_on():
    from vlkit.toyworld import pretraining

    config = tw.pretrain_config("tiny")
    lm, clip = pretraining.job_key(config, "toy-lm"), pretraining.job_key(config, "toy-clip")
    assert lm.startswith("job toy-lm ") and clip.startswith("job toy-clip ") and lm.split()[2] != clip.split()[2]
    other_clip = copy.deepcopy(config)
    other_clip["clip"]["lr"] *= 2
    assert pretraining.job_key(other_clip, "toy-lm") == lm  # toy-lm's checkpoints outlive a toy-clip change
    assert pretraining.job_key(other_clip, "toy-clip") != clip
    for section, key, value in (("lm", "lr", 1.0), ("data", "n_train", 7), ("seed", None, 1)):
        changed = copy.deepcopy(config)
        if key is None:
            changed[section] = value
        else:
            changed[section][key] = value
        assert pretraining.job_key(changed, "toy-lm") != lm, section


def test_a_finished_job_of_another_config_is_not_reused(tmp_path):
    from vlkit.toyworld import pretraining

    config = tw.pretrain_config("tiny")
    kept = tmp_path / "checkpoints" / "toy-clip.finished"
    (kept / "toy-clip").mkdir(parents=True)
    (kept / "result.json").write_text("{}")
    (kept / "key.txt").write_text("job toy-clip 0000000000000000 vlkit 0 torch 0 transformers 0\n")
    with pytest.raises(RuntimeError, match=r"finished toy-clip in .*toy-clip.finished belongs to another config"):
        pretraining._run_job("toy-clip", tmp_path / "weights", tmp_path / "data", config, lambda *a: None,
                             tmp_path / "checkpoints")
    (kept / "key.txt").write_text(pretraining.job_key(config, "toy-clip") + "\n")
    assert pretraining._run_job("toy-clip", tmp_path / "weights", tmp_path / "data", config, lambda *a: None,
                                tmp_path / "checkpoints") == {}
    assert (tmp_path / "weights" / "toy-clip").is_dir()


def test_a_damaged_checkpoint_is_named(tmp_path):
    from vlkit.toyworld.models import StepCheckpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = StepCheckpoint(tmp_path / "toy-lm", every=2, key="abc")
    assert ckpt.restore(model, opt) == (0, [], None)
    ckpt.save(2, 10, model, opt, [1.0, 0.5], extra="x")
    assert StepCheckpoint(tmp_path / "toy-lm", 2, "abc").restore(model, opt) == (2, [1.0, 0.5], "x")
    with pytest.raises(RuntimeError, match=r"toy-lm/state.pt: it belongs to another config.*delete it"):
        StepCheckpoint(tmp_path / "toy-lm", 2, "def").restore(model, opt)
    with pytest.raises(RuntimeError, match=r"(?s)toy-lm/state.pt: .*size mismatch.*delete it"):
        StepCheckpoint(tmp_path / "toy-lm", 2, "abc").restore(torch.nn.Linear(3, 2), opt)
    (tmp_path / "toy-lm" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=r"toy-lm/state.pt.*delete it"):
        ckpt.restore(model, opt)

def test_tokenizer_chat_template(tiny_toy_world):
    from transformers import AutoTokenizer

    for d in (tiny_toy_world.tokenizer_dir, tiny_toy_world.lm_dir, tw.PACKAGE_WEIGHTS / "toy-lm"):
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
    manual = tw.normalize(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None])
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


def test_lm_loss_weights_answers_and_other_tokens(tiny_toy_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlkit.toyworld import models

    tok = AutoTokenizer.from_pretrained(tiny_toy_world.tokenizer_dir)
    convs = models.lm_conversations(4, 0, tw.pretrain_config("tiny")["lm"], grid=3, max_objects=4)
    batch = models.lm_batch(tok, convs, other_weight=0.0)
    kept = batch["labels"][0][batch["labels"][0] != -100].tolist()
    answers = [m["content"] for m in convs[0] if m["role"] == "assistant"]
    assert tok.decode(kept) == "".join(a + "<|im_end|>" for a in answers)
    weighted = models.lm_batch(tok, convs, other_weight=0.25)
    w, att = weighted["weights"], weighted["attention_mask"]
    assert set(w[att.bool()].unique().tolist()) == {0.25, 1.0} and (w[~att.bool()] == 0).all()
    assert (w == 1.0).sum() == (batch["weights"] == 1.0).sum()  # the answers keep full weight
    # the weighted loss is the mean token loss when every weight is 1
    lm = AutoModelForCausalLM.from_pretrained(tiny_toy_world.lm_dir)
    ones = dict(weighted, weights=att.float())
    with torch.no_grad():
        ref = lm(input_ids=ones["input_ids"], attention_mask=att,
                 labels=ones["input_ids"].masked_fill(att == 0, -100)).loss
        assert torch.allclose(models.lm_loss(lm, ones), ref, atol=1e-5)


def test_report_has_probes(tiny_toy_world):
    r = tiny_toy_world.report
    assert set(r["seconds"]) >= {"tokenizer", "toy-clip", "toy-lm", "toy-clip probes", "toy-lm probes", "total"}
    if r["machine"]["parallel_jobs"]:  # each job's own process reports its peak memory
        assert set(r["job_peak_rss_mb"]) == {"toy-clip", "toy-lm"}
        assert all(50 < mb < 24 * 1024 for mb in r["job_peak_rss_mb"].values()), r["job_peak_rss_mb"]
    assert r["machine"]["fp32_matmul_gflops_1_thread"] > 0
    lm = r["toy_lm"]
    assert lm["first_stage"]["train_loss_last"] < lm["first_stage"]["train_loss_first"]
    # the final model's size: the first stage's plus 30 input and 30 output rows
    hidden = tw.pretrain_config("tiny")["lm"]["arch"]["hidden_size"]
    assert lm["params"] == lm["first_stage"]["params"] + 2 * 30 * hidden
    assert set(lm["val_answer_accuracy_by_type"]) == set(QUESTION_TYPES)
    assert 0.0 <= r["toy_clip"]["retrieval_top1_batch100"] <= 1.0
    probes = r["linear_probes"]
    # where objects are lives in the patch tokens, not in the pooled CLS (ANCHORS.md)
    assert probes["position"]["patch_cells"]["exact"] > probes["position"]["cls"]["exact"] + 0.2
    assert probes["position"]["patch_cells"]["per_label"] > 0.85
    per_object = probes["per_object"]
    assert per_object["colour"]["cell_mean"] > per_object["colour"]["majority"] + 0.3
    assert per_object["occupancy"]["cell_mean"] > per_object["occupancy"]["majority"]
    assert set(per_object["shape"]) == {"majority", "cell_mean", "patch_window_3x3"}
    # the second stage ran and the LM is also scored with each object written as its one token
    assert lm["objects"]["steps"] == tw.pretrain_config("tiny")["lm"]["objects"]["steps"]
    assert lm["objects"]["vocab_added"] == len(OBJECT_TOKENS) == 30
    assert set(lm["val_answer_accuracy_by_type_from_object_tokens"]) == set(QUESTION_TYPES)
    assert {"toy-lm objects", "toy-lm"} <= set(r["seconds"])


def test_val_questions_carry_the_references(tiny_toy_world):
    """Every val question carries blind / uniform / position-blind and toy-lm's own from-text hit; the world's
    report averages them per type, spatial types marked; toy-lm's per-question hits average to its probe."""
    import json

    val = json.loads((tiny_toy_world.data_dir / "instruct_val.json").read_text())
    assert all(set(r["references"]) == {"blind", "uniform", "position_blind", "toy_lm_from_text"} for r in val)
    lm = tiny_toy_world.report["toy_lm"]
    for qtype, acc in lm["val_answer_accuracy_by_type"].items():
        hits = [r["references"]["toy_lm_from_text"] for r in val if r["question_type"] == qtype]
        assert round(sum(hits) / len(hits), 3) == acc
    base = tiny_toy_world.report["answer_baselines"]
    for qtype in QUESTION_TYPES:
        assert set(base[qtype]) == {"blind", "uniform", "position_blind", "toy_lm_from_text", "n", "spatial"}
        assert base[qtype]["spatial"] == (qtype in ("colour_at_position", "shape_at_position",
                                                    "position_of_object", "relation"))
    assert base["relation"]["position_blind"] < 1.0 and base["count"]["position_blind"] == 1.0


def test_lm_breakdown_splits_the_probe(tiny_toy_world):
    """The finer split of toy-lm's accuracy from text covers every val question once and agrees with the probe."""
    from vlkit.toyworld import probes

    split = probes.lm_breakdown(tiny_toy_world.lm_dir, tiny_toy_world.data_dir)
    by_type = tiny_toy_world.report["toy_lm"]["val_answer_accuracy_by_type"]
    assert set(split) == set(by_type)
    for qtype, groups in split.items():
        n = sum(k for _, k in groups.values())
        assert n > 0
        assert sum(acc * k for acc, k in groups.values()) / n == pytest.approx(by_type[qtype], abs=0.01)
    assert set(split["relation"]) <= {"nothing", "an object"}
    assert set(split["existence"]) <= {"yes", "no"}


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
        tw.pretrain_config("huge")
    # the shipped preset's model references point into the package and build nothing
    monkeypatch.setenv(tw.ENV_PRESET, "default")
    monkeypatch.setenv(tw.ENV_DIR, str(tiny_toy_world.root.parent / "never-built"))
    assert tw.resolve_toy("toy:lm") == str(tw.PACKAGE_WEIGHTS / "toy-lm")
    assert tw.toy_path_if_available("toy:data") is None
    assert not (tiny_toy_world.root.parent / "never-built").exists()


# ---- the toy-lm curriculum (phases) and schedules ---------------------------------------------------------------
def test_lm_phases_restrict_types_and_are_validated():
    from vlkit.toyworld import models, pretraining

    lm = tw.pretrain_config("v4")["lm"]
    phases = models.lm_phases(lm)
    assert [p["steps"] for p in phases] == [1000, 11000] and phases[0]["types"] == pretraining.LOOKUP_TYPES
    assert phases[1]["types"] is None and phases[1]["turns"] == list(lm["turns"])  # the config's own settings
    assert [models.phase_at(phases, s) is phases[i] for s, i in ((0, 0), (999, 0), (1000, 1), (11999, 1))] == [True] * 4
    world = models.world_scenes(tw.pretrain_config("v4")["data"])
    chats = models.lm_chats(np.random.default_rng(0), 20, phases[0], **world)
    questions = [m["content"] for c in chats for m in c if m["role"] == "user"]
    assert len(questions) >= 20 * 10  # 10-14 questions per chat, no captions
    assert all(("colour is" in q or "shape is" in q) for q in questions)  # the three look-up types only
    assert models.lm_phases({**lm, "phases": None}) == [{"types": None, "turns": list(lm["turns"]),
                                                         "caption_share": lm["caption_share"], "steps": 12000}]
    with pytest.raises(ValueError, match="add up to 1000, not the config's steps 12000"):
        models.lm_phases({**lm, "phases": [{"steps": 1000}]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['type'\]"):
        models.lm_phases({**lm, "phases": [{"steps": 12000, "type": ["count"]}]})


def test_type_weights_ask_a_type_more_often_and_are_validated():
    from vlkit.data import toy
    from vlkit.toyworld import models

    assert models.question_types(None, None) == tuple(toy.QUESTION_TYPES)
    weighted = models.question_types(None, {"relation": 3})
    assert weighted.count("relation") == 3 and len(weighted) == len(toy.QUESTION_TYPES) + 2
    assert models.question_types(["count", "relation"], {"relation": 2}) == ("count", "relation", "relation")
    with pytest.raises(ValueError, match=r"\['colour'\] not among the question types"):
        models.question_types(None, {"colour": 2})
    with pytest.raises(ValueError, match="whole number >= 1"):
        models.question_types(None, {"relation": 0.5})
    world = models.world_scenes(tw.pretrain_config("v4")["data"])
    cfg = {"types": None, "turns": [8, 12], "caption_share": 0.0}
    plain = models.lm_chats(np.random.default_rng(0), 40, cfg, **world)
    assert models.lm_chats(np.random.default_rng(0), 40, {**cfg, "type_weights": None}, **world) == plain

    def relation_share(chats):
        questions = [m["content"] for c in chats for m in c if m["role"] == "user"]
        return sum(bool(re.search(r"What is (left of|right of|above|below) the", q)) for q in questions) / len(questions)

    heavy = models.lm_chats(np.random.default_rng(0), 40, {**cfg, "type_weights": {"relation": 4}}, **world)
    assert relation_share(plain) < 0.2 < 0.3 < relation_share(heavy)  # 1 of 8 types against 4 of 11


def test_lm_schedules():
    """cosine (shipped) decays from the warm-up on; held keeps the peak until the last tenth of the steps."""
    from vlkit.toyworld import models

    held = {"steps": 1000, "lr": 1e-3, "schedule": "held"}
    assert models.lm_lr(0, held) == pytest.approx(1e-3 / 50)  # warm-up: 5 % of the steps, at most 100
    assert models.lm_lr(49, held) == models.lm_lr(899, held) == pytest.approx(1e-3)
    assert models.lm_lr(999, held) < 0.1e-3 and models.lm_lr(950, held) < 1e-3
    cosine = {"steps": 1000, "lr": 1e-3}
    assert models.lm_lr(49, cosine) == pytest.approx(1e-3) and models.lm_lr(500, cosine) < 0.6e-3
    with pytest.raises(ValueError, match="valid are cosine, held"):
        models.lm_lr(0, {**held, "schedule": "linear"})


def test_a_phased_lm_pretraining_resumes_to_the_same_weights(tiny_toy_world, tmp_path):
    """Phased chats are drawn step by step; their RNG state is checkpointed, so a resumed run equals a straight
    one, across the phase boundary."""
    from transformers import AutoTokenizer

    from vlkit.toyworld import models

    tok = AutoTokenizer.from_pretrained(tiny_toy_world.tokenizer_dir)
    cfg = tw.pretrain_config("tiny")
    lm = dict(cfg["lm"], steps=4, batch=4, schedule="held", arch=dict(cfg["lm"]["arch"], num_hidden_layers=1),
              phases=[{"steps": 2, "types": ["colour_at_position"], "turns": [2, 3], "caption_share": 0.0},
                      {"steps": 2}])
    none = lambda *a: None  # noqa: E731
    models.train_lm(tok, tmp_path / "straight", lm, 0, cfg["data"], none)

    class Stop(Exception):
        pass

    def die_at_3(done, text=""):
        if done == 3:
            raise Stop

    ckpt = models.StepCheckpoint(tmp_path / "ckpt", 2, "k")
    with pytest.raises(Stop):
        models.train_lm(tok, tmp_path / "resumed", lm, 0, cfg["data"], die_at_3, ckpt)
    stats = models.train_lm(tok, tmp_path / "resumed", lm, 0, cfg["data"], none, ckpt)
    assert stats["resumed_at_step"] == 2
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hard_negatives_change_shapes_only():
    from collections import Counter

    from vlkit.data import toy
    from vlkit.toyworld import models

    rng = np.random.default_rng(0)
    objs = [toy.Obj("circle", "red", 0, 0, 0.6, 0, 0), toy.Obj("square", "blue", 0, 1, 0.6, 0, 0),
            toy.Obj("cross", "green", 2, 2, 0.6, 0, 0)]
    swaps = 0
    for _ in range(50):
        neg = models.hard_negative(objs, rng)
        assert [(o.colour, o.row, o.col) for o in neg] == [(o.colour, o.row, o.col) for o in objs]
        changed = [(a.shape, b.shape) for a, b in zip(objs, neg) if a.shape != b.shape]
        assert len(changed) in (1, 2)
        if len(changed) == 2:  # a swap: the bag of shapes is kept, only the colour-shape binding changes
            swaps += 1
            assert Counter(o.shape for o in neg) == Counter(o.shape for o in objs)
    assert 10 < swaps < 40
    assert [o.shape for o in objs] == ["circle", "square", "cross"]  # the scene itself is untouched


def test_cell_targets_name_each_patch_by_its_cells_contents():
    """8 x 8 patches of 8 px over 3 x 3 cells of 64/3 px: a patch belongs to the cell holding its centre (3, 2, 3
    rows and columns), 0 is an empty cell, then colours / shapes in their vocabulary order (+1)."""
    from vlkit.data import toy
    from vlkit.toyworld import models

    scenes = [{"objects": [{"shape": "cross", "colour": "red", "row": 0, "col": 0},
                           {"shape": "circle", "colour": "orange", "row": 1, "col": 2}]},
              {"objects": [{"shape": "square", "colour": "blue", "row": 2, "col": 1}]}]
    colour, shape = models.cell_targets(scenes, 3, 64, 8)
    assert colour.shape == shape.shape == (2, 64) and colour.dtype == torch.long
    c0, s0 = colour[0].view(8, 8), shape[0].view(8, 8)
    red, cross = 1 + toy.COLOURS_LIST.index("red"), 1 + toy.SHAPES.index("cross")
    assert (c0[:3, :3] == red).all() and (s0[:3, :3] == cross).all()  # patch centres 4, 12, 20 < 21.3
    assert (c0[:3, 3:] == 0).all() and (c0[3:5, :5] == 0).all()  # centres 28, 36 are row/column 1
    orange, circle = 1 + toy.COLOURS_LIST.index("orange"), 1 + toy.SHAPES.index("circle")
    assert (c0[3:5, 5:] == orange).all() and (s0[3:5, 5:] == circle).all()
    assert int((colour[0] > 0).sum()) == 9 + 6 and int((shape[0] > 0).sum()) == 15
    c1 = colour[1].view(8, 8)
    assert (c1[5:, 3:5] == 1 + toy.COLOURS_LIST.index("blue")).all() and int((c1 > 0).sum()) == 6


def test_the_cell_objective_trains_a_head_that_is_not_saved(tiny_toy_world, tmp_path):
    """``clip.cells`` adds the per-patch loss (the loop's losses change), trains through the layer it names, and
    saves only the CLIPModel: the same files and keys as without it, other weights."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vlkit.toyworld import models

    tok = AutoTokenizer.from_pretrained(tiny_toy_world.weights_dir / "tokenizer")
    cfg = dict(tw.pretrain_config("tiny")["clip"], steps=3, batch=8)
    cfg.pop("cells", None)
    plain = models.train_clip(tiny_toy_world.data_dir, tok, tmp_path / "plain", cfg, 0, lambda *a: None)
    cells = models.train_clip(tiny_toy_world.data_dir, tok, tmp_path / "cells",
                              dict(cfg, cells={"weight": 1.0, "layer": -2}), 0, lambda *a: None)
    assert cells["train_loss_first"] > plain["train_loss_first"] + 0.5  # + about ln 7 / 2 + ln 6 / 2 at the start
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "cells"))
    assert a.keys() == b.keys() and not any("cells" in k for k in b)
    layer3 = "vision_model.encoder.layers.2.mlp.fc2.weight"  # under hidden_states[-2]: the head's loss reaches it
    assert not torch.equal(a[layer3], b[layer3])
    last = "vision_model.encoder.layers.3.mlp.fc2.weight"
    assert a[last].shape == b[last].shape


def test_contrastive_loss_without_negatives_is_clips(tiny_toy_world):
    from transformers import AutoTokenizer, CLIPModel

    from vlkit.data import toy
    from vlkit.toyworld import models

    model = CLIPModel.from_pretrained(tiny_toy_world.clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_toy_world.clip_dir)
    scenes = toy.load_scenes(tiny_toy_world.data_dir, "train")[:4]
    images = models.normalize(models.load_images(tiny_toy_world.data_dir, scenes))
    caps = [s["caption"] for s in scenes]
    with torch.no_grad():
        out = model(pixel_values=images, **models.clip_text(tok, caps), return_loss=True)
        ours = models.contrastive_loss(out.logits_per_image)
        negs = model(pixel_values=images, **models.clip_text(tok, caps + caps[::-1]))
    assert torch.allclose(ours, out.loss, atol=1e-6)
    assert negs.logits_per_image.shape == (4, 8) and models.contrastive_loss(negs.logits_per_image) > ours


def test_object_token_captions():
    from vlkit.data import toy

    cap = "northwest: red circle, north: nothing, northeast: blue cross"
    assert toy.object_token_caption(cap) == "northwest: <obj_red_circle>, north: nothing, northeast: <obj_blue_cross>"
    assert toy.object_token_caption("top left: green diamond, top: nothing") == "top left: <obj_green_diamond>, top: nothing"
    assert len(set(toy.OBJECT_TOKENS)) == len(toy.COLOURS_LIST) * len(toy.SHAPES)


def test_lm_chats_write_a_share_of_scenes_with_object_tokens():
    """``object_tokens`` writes that share of the scenes with one token per object (answers and asked-for
    captions stay in words); without it (or at 0) the chats are those drawn before the option existed."""
    from vlkit.data import toy
    from vlkit.toyworld import models

    world = models.world_scenes(tw.pretrain_config("v4")["data"])
    cfg = {"types": None, "turns": [2, 3], "caption_share": 0.2}
    plain = models.lm_chats(np.random.default_rng(0), 60, cfg, **world)
    assert models.lm_chats(np.random.default_rng(0), 60, {**cfg, "object_tokens": 0.0}, **world) == plain
    fused = models.lm_chats(np.random.default_rng(0), 200, {**cfg, "object_tokens": 0.5}, **world)
    with_tokens = [c for c in fused if "<obj_" in c[0]["content"]]
    assert 0.3 < len(with_tokens) / len(fused) < 0.7
    assert not any("<obj_" in m["content"] for c in fused for m in c if m["role"] == "assistant")
    for c in with_tokens:  # the whole scene is written one way: no object is left in words
        scene = c[0]["content"].split("Scene: ", 1)[1].split(". ", 1)[0]
        assert toy.object_token_caption(scene) == scene
        assert not any(f"{col} {shape}" in scene for col in toy.COLOURS_LIST for shape in toy.SHAPES)


def test_object_tokens_start_as_the_sum_of_their_words(tiny_toy_world):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from vlkit.data import toy
    from vlkit.toyworld import models, pretraining

    tok = AutoTokenizer.from_pretrained(tiny_toy_world.tokenizer_dir)  # the first stage's vocabulary
    arch = pretraining.lm_base_config(tw.pretrain_config("tiny"))["lm"]["arch"]
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), bos_token_id=None, pad_token_id=tok.pad_token_id,
                                         **arch))
    n = len(tok)
    models.add_object_tokens(model, tok, 0)
    assert len(tok) == n + 30 and model.get_input_embeddings().num_embeddings == n + 30
    assert tok.convert_tokens_to_ids("<obj_red_circle>") in tok("north: <obj_red_circle>, south: nothing")["input_ids"]
    emb = model.get_input_embeddings().weight
    red, circle = (tok.encode(" " + w)[-1] for w in ("red", "circle"))
    assert torch.allclose(emb[tok.convert_tokens_to_ids(toy.object_token("red", "circle"))], emb[red] + emb[circle])


def test_an_earlier_pretraining_is_reused_where_its_settings_match(tiny_toy_world, tmp_path, monkeypatch):
    """``reuse``: toy-clip, and toy-lm's first stage, come from an earlier pretraining of the same settings (one
    made before the second stage existed), to the same files as a straight run; a toy-lm of the same settings is
    taken whole; other settings, versions or a damaged directory are refused, naming what differs."""
    from vlkit.toyworld import pretraining

    tiny = tw.pretrain_config("tiny")
    monkeypatch.setitem(pretraining.PRESETS, "tiny", pretraining.lm_base_config(pretraining.PRESETS["tiny"]))
    earlier = tw.pretrain(tmp_path / "earlier", "tiny", 0, data_dir=tiny_toy_world.data_dir)
    monkeypatch.undo()
    assert "objects" not in earlier["config"]["lm"] and "objects" in tiny["lm"]
    again = tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir,
                        reuse=tmp_path / "earlier")
    first = json.loads((tiny_toy_world.weights_dir / "manifest.json").read_text())
    assert again["files"] == first["files"]
    assert again["report"]["toy_lm"]["first_stage"]["reused_from"]["config_hash"] == earlier["config_hash"]
    assert again["report"]["toy_clip"]["reused_from"]["config_hash"] == earlier["config_hash"]
    # the tiny world's own weights: toy-clip and the whole toy-lm (second stage included) are taken
    work = tmp_path / "work"
    taken = pretraining.reuse_earlier(work, tiny, tiny_toy_world.weights_dir)
    assert taken["taken"] == ["toy-clip", "toy-lm"]
    assert (work / "checkpoints" / "toy-lm.finished" / "toy-lm" / "model.safetensors").is_file()
    assert not (work / "checkpoints" / "toy-lm" / "base.finished").exists()
    # ... but as a first stage only where no second stage was trained: a v4-like config takes toy-clip alone
    v4_like = pretraining.lm_base_config(tiny)
    v4_like["lm"]["lr"] = 0.5
    assert pretraining.reuse_earlier(tmp_path / "work2", v4_like, tiny_toy_world.weights_dir)["taken"] == ["toy-clip"]
    with pytest.raises(ValueError, match=r"nothing in it was made with this preset's settings.*toy-clip differs "
                                         r"in seed.*toy-lm differs in lm.objects, seed"):
        pretraining.reuse_earlier(tmp_path / "work3", tw.pretrain_config("tiny", seed=1), tmp_path / "earlier")
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "earlier", damaged)
    (damaged / "toy-lm" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--reuse .*damaged: .*toy-lm/config.json .*; pass the weights directory "
                                         r"an earlier `vlkit toy pretrain` wrote, or drop --reuse"):
        pretraining.reuse_earlier(tmp_path / "work4", tiny, damaged)
    monkeypatch.setattr(pretraining, "_versions", lambda: {"vlkit": "9", "torch": "9", "transformers": "9"})
    with pytest.raises(ValueError, match=r"it was written by .*this is .*not taken"):
        pretraining.reuse_earlier(tmp_path / "work5", tiny, tmp_path / "earlier")


def test_a_focus_stage_fine_tunes_an_earlier_toy_lm_taken_as_its_objects_stage(tiny_toy_world, tmp_path,
                                                                             monkeypatch):
    """A third toy-lm stage (``focus``, as v8 adds to v7): ``--reuse`` of weights without it takes toy-clip and the
    whole earlier toy-lm as the kept objects stage, and trains only the focus stage, to the same weights as
    ``train_lm_focus`` on that toy-lm, also when it was interrupted and resumed; the report nests every stage's
    figures and says what was reused."""
    from vlkit.toyworld import _runtime, models, pretraining

    focus = dict(steps=4, batch=8, lr=1e-3, type_weights={"relation": 3}, object_tokens=0.5, turns=[4, 6],
                 caption_share=0.05, caption_scene=1.0, other_token_weight=0.0)
    tiny = copy.deepcopy(pretraining.PRESETS["tiny"])
    earlier = tiny_toy_world.weights_dir  # the tiny preset's toy-lm stops after its objects stage
    assert "focus" not in tiny["lm"] and "objects" in tiny["lm"]
    monkeypatch.setitem(pretraining.PRESETS, "tiny", {**tiny, "lm": {**tiny["lm"], "focus": focus}})
    config = tw.pretrain_config("tiny")
    assert pretraining.lm_stages(config) == ["objects", "focus"]
    assert pretraining.job_steps(config, "toy-lm") == config["lm"]["steps"] + config["lm"]["objects"]["steps"] + 4
    # the focus stage dies at its third step (the only steps trained: the rest is reused) and resumes
    monkeypatch.setenv("VLKIT_TOY_PARALLEL", "0")  # the job runs in this process, where the failure is injected
    real_step, calls = models._step, []

    def dies_at_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(models, "_step", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir, reuse=earlier)
    assert not (tmp_path / "weights").exists()
    work = tmp_path / f".weights.building-{tw.world_id('tiny')}"
    saved = torch.load(work / "checkpoints" / "toy-lm" / "focus" / "state.pt", weights_only=True)["step"]
    assert 1 <= saved <= 2
    monkeypatch.setattr(models, "_step", real_step)
    made = tw.pretrain(tmp_path / "weights", "tiny", 0, data_dir=tiny_toy_world.data_dir, reuse=earlier)
    lm = made["report"]["toy_lm"]
    assert lm["focus"]["resumed_at_step"] == saved and not work.exists()
    source = json.loads((earlier / "manifest.json").read_text())["config_hash"]
    assert lm["objects"]["reused_from"]["config_hash"] == source and lm["focus"]["steps"] == 4
    assert "first_stage" in lm and "val_answer_accuracy_by_type" in lm
    assert made["files"]["toy-clip/model.safetensors"] == json.loads(
        (earlier / "manifest.json").read_text())["files"]["toy-clip/model.safetensors"]
    direct = tmp_path / "direct"
    with _runtime.quiet_runtime(pretraining.job_threads(config, "toy-lm")):  # the job's thread count, as pretraining
        models.train_lm_focus(earlier / "toy-lm", direct, focus, 0, config["data"], lambda *a: None)
    assert made["files"]["toy-lm/model.safetensors"]["sha256"] == shipped.sha256_file(direct / "model.safetensors")
    assert made["files"]["toy-lm/model.safetensors"] != json.loads(
        (earlier / "manifest.json").read_text())["files"]["toy-lm/model.safetensors"]
    with pytest.raises(ValueError, match=r"not among the question types"):
        models.train_lm_focus(earlier / "toy-lm", tmp_path / "bad", {**focus, "type_weights": {"where": 2}}, 0,
                              config["data"], lambda *a: None)


def test_a_preset_built_on_first_use_takes_what_it_shares_with_the_shipped_weights(tiny_toy_world, tmp_path,
                                                                                    monkeypatch):
    """A non-shipped preset's first use pretrains only what the package's weights do not already hold (as v6
    was made from v4's toy-clip and toy-lm first stage): here the 'package' is a tiny pretraining without the second
    stage, and the tiny world built on it equals the one pretrained from scratch."""
    from vlkit.toyworld import pretraining

    monkeypatch.setitem(pretraining.PRESETS, "tiny", pretraining.lm_base_config(pretraining.PRESETS["tiny"]))
    package = tmp_path / "package"
    tw.pretrain(package, "tiny", 0, data_dir=tiny_toy_world.data_dir)
    monkeypatch.undo()
    monkeypatch.setattr(shipped, "PACKAGE_WEIGHTS", package)
    assert pretraining.reusable_from(tw.pretrain_config("tiny"), package)
    assert not pretraining.reusable_from(tw.pretrain_config("tiny", seed=1), package)
    built = world.build_toy_world(tmp_path / "world", preset="tiny")
    assert built.report["toy_lm"]["first_stage"]["reused_from"]["config_hash"] != tw.world_id("tiny")
    assert built.report["toy_clip"]["reused_from"]
    first = json.loads((tiny_toy_world.weights_dir / "manifest.json").read_text())
    assert json.loads((built.weights_dir / "manifest.json").read_text())["files"] == first["files"]
