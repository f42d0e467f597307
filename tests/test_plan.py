"""``vlkit plan``: offline memory estimates from the component configs (no download, no model build)."""
from __future__ import annotations

import pytest

REAL = "recipes/llava15_qwen2.5-1.5b_clip-l336.yaml"
GB = 1e9


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _plan(overrides=(), stages=None, **kw):
    from vlkit.config import load_recipe
    from vlkit.plan import plan

    return plan(load_recipe(REAL, list(overrides)), stages, online=False, **kw)


def _row(stage_plan, prefix):
    return next(r for r in stage_plan.rows if r.component.strip().startswith(prefix))


def test_real_recipe_plans_offline_with_published_dims():
    p = _plan(gpus=1, zero=0)
    assert p.llm.source.startswith(("built-in table", "HF cache"))
    assert abs(p.llm.params - 1_543_714_304) < 1e6  # Qwen2.5-1.5B: 1.54B (tied embeddings)
    assert (p.llm.layers, p.llm.hidden, p.llm.kv_heads, p.llm.vocab) == (28, 1536, 2, 151936)
    assert abs(p.encoder.params - 303_507_456) < 1e6  # CLIP ViT-L/14-336 vision tower
    assert p.vision.image_tokens == 576 and p.encoder.tokens == 577
    align, instruct = p.stages
    llm = _row(align, "llm")
    assert 3.0 * GB < llm.weights < 3.2 * GB  # bf16 weights ~ 3.1 GB
    assert llm.trainable == 0 and llm.grads == 0 and llm.optimizer == 0  # frozen in align
    assert _row(align, "encoder").weights == pytest.approx(303_507_456 * 4)  # fp32 checkpoint
    proj = _row(align, "projector")
    assert proj.params == 1024 * 1536 + 1536 + 1536 * 1536 + 1536
    assert proj.optimizer == pytest.approx(proj.trainable * 8)  # fp32 params: two fp32 moments
    lora = _row(instruct, "lora")
    assert lora.params == 28 * 128 * (9 * 1536 + 2 * 256 + 3 * 8960)  # r=128 on every linear layer
    assert (align.micro_batch, instruct.micro_batch, align.seq_len) == (32, 16, 2048)
    assert align.activation_terms["layers_stored"] > 0 and instruct.gradient_checkpointing
    for s in p.stages:
        assert s.total == pytest.approx(sum(r.total for r in s.rows))
        assert s.verdict().startswith(("fits in", "does not fit"))


def test_zero3_shards_weights_across_gpus():
    one = _plan(stages=["instruct"], gpus=8, zero=0).stages[0]
    z1 = _plan(stages=["instruct"], gpus=8, zero=1).stages[0]
    z2 = _plan(stages=["instruct"], gpus=8, zero=2).stages[0]
    z3 = _plan(stages=["instruct"], gpus=8, zero=3).stages[0]
    for part in ("encoder", "projector", "llm", "lora"):
        assert _row(z3, part).weights == pytest.approx(_row(one, part).weights / 8)
        assert _row(z1, part).weights == pytest.approx(_row(one, part).weights)
    lora = [_row(x, "lora") for x in (one, z1, z2, z3)]
    assert lora[1].optimizer == pytest.approx(lora[0].optimizer / 8)  # ZeRO-1: optimizer states
    assert lora[2].grads < lora[1].grads and lora[2].grads == pytest.approx(lora[3].grads)  # ZeRO-2: gradients
    assert any("zero-3 gathered" in r.component for r in z3.rows)
    assert z3.total < z2.total < one.total


def test_gradient_checkpointing_and_smaller_batches_reduce_activations():
    off = _plan(["stages.instruct.gradient_checkpointing=false"], ["instruct"]).stages[0]
    on = _plan(["stages.instruct.gradient_checkpointing=true"], ["instruct"]).stages[0]
    assert _row(on, "llm").activations < 0.5 * _row(off, "llm").activations
    assert on.total < off.total
    half = _plan(["stages.instruct.gradient_checkpointing=false"], ["instruct"], micro_batch=8).stages[0]
    assert _row(half, "llm").activations == pytest.approx(_row(off, "llm").activations / 2, rel=0.05)
    short = _plan(stages=["instruct"], seq_len=1024).stages[0]
    assert short.total < on.total


def test_verdict_and_suggestions():
    tight = _plan(stages=["align"], gpus=8, zero=2, gpu_memory_gb=24).stages[0]
    assert not tight.fits
    text = tight.verdict()
    assert text.startswith("does not fit") and "GB over" in text
    assert "gradient_checkpointing=true" in text and "--zero 3" in text and "micro-batch 2 per GPU" in text
    roomy = _plan(stages=["instruct"], gpu_memory_gb=1000).stages[0]
    assert roomy.fits and roomy.verdict().startswith("fits in 1000 GB")


def test_micro_batch_is_split_across_gpus_and_zero_follows_the_recipe():
    from vlkit.config import TrainConfig

    one, eight = _plan(stages=["align"]).stages[0], _plan(stages=["align"], gpus=8).stages[0]
    assert (one.micro_batch, eight.micro_batch, eight.global_micro_batch) == (32, 4, 32)  # vlkit shards micro-batches
    assert _row(eight, "llm").activations < _row(one, "llm").activations / 4
    assert eight.zero == 0
    if "deepspeed" in TrainConfig.model_fields:  # multi-process training settings
        z = _plan(["train.distributed=deepspeed", "train.deepspeed={zero_stage: 3}"], ["align"], gpus=8).stages[0]
        assert z.zero == 3 and _row(z, "llm").weights == pytest.approx(_row(eight, "llm").weights / 8)


def test_full_finetune_bf16_counts_master_copy():
    s = _plan(["stages.instruct.llm=full"], ["instruct"]).stages[0]
    llm = _row(s, "llm")
    assert llm.trainable == llm.params
    assert llm.grads == pytest.approx(llm.params * 2)  # bf16 gradients
    assert llm.optimizer == pytest.approx(llm.params * 12)  # fp32 m, v + fp32 master copy


def test_toy_recipe_plans_without_building_the_toy_world(tmp_path, monkeypatch):
    from vlkit.config import load_recipe
    from vlkit.plan import plan

    monkeypatch.setenv("VLKIT_TOY_DIR", str(tmp_path / "not-built"))
    monkeypatch.setenv("VLKIT_TOY_PRESET", "tiny")
    p = plan(load_recipe("recipes/mlp_patch.yaml"), online=False, device="cpu")
    assert not (tmp_path / "not-built").exists()
    assert "toyworld" in p.llm.source and p.llm.layers == 4 and p.vision.image_tokens == 16
    assert all(s.compute_bytes == 4 and s.total > 0 for s in p.stages)


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="stage 'instrct'.*Did you mean 'instruct'"):
        _plan(stages=["instrct"])


def test_cli_plan_prints_a_verdict():
    from typer.testing import CliRunner

    from vlkit.cli import app

    res = CliRunner().invoke(app, ["plan", REAL, "--gpus", "8", "--zero", "2"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # rich wraps at the terminal width
    assert "stage align" in out and "stage instruct" in out and "ZeRO-2" in out
    assert "built-in table" in out or "HF cache" in out
    assert "fits in 80 GB" in out or "does not fit" in out
    bad = CliRunner().invoke(app, ["plan", REAL, "--stage", "instrct"])
    assert bad.exit_code == 1 and "instrct" in " ".join(bad.output.split())
