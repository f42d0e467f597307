"""Multi-process training on CPUs (gloo): DDP, DeepSpeed ZeRO and FSDP reproduce the single-process run.

Every strategy is compared with one single-process reference on the same global batches: the loss is token-weighted
over the global batch (the token count is all-reduced; the ranks' averaged gradients are scaled back to a sum), so
the logged losses agree up to float summation order (seen: ~1e-7 relative). LoRA dropout is 0 here: dropout masks
are drawn per rank and would make the runs statistically equal but not comparable number by number.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import losses

RECIPE = "recipes/mlp_patch.yaml"
# 4 steps of 6 samples in 2 micro-batches of 3: with 2 ranks the slices are uneven (2 + 1 samples per micro-batch),
# so a per-rank mean (instead of the global token weighting) would show in the numbers.
SHORT = ["train.stages=[instruct]", "stages.instruct.max_steps=4", "stages.instruct.batch_size=6",
         "stages.instruct.grad_accum=2", "stages.instruct.lora.dropout=0", "stages.instruct.save_every=2",
         "stages.instruct.eval_max_samples=8", "stages.instruct.eval_batch_size=8", "data.max_length=224"]
LOSS_RTOL = 1e-5  # DDP, ZeRO and FSDP alike: only the order of float sums differs from one process
STOP_SCRIPT = """
import sys
from vlkit.config import load_recipe
from vlkit.train import train
run_dir, stage, step, *overrides = sys.argv[1:]
train(load_recipe({recipe!r}, overrides), run_dir, stop_after=(stage, int(step)))
"""


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not has_deepspeed(), reason="deepspeed is not installed "
                                     "(pip install -e '.[test,deepspeed]' to run the DeepSpeed tests)")


def run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def cli(*args: str) -> list[str]:
    return ["-m", "vlkit.cli", "train", RECIPE, *args]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, ref_dir: Path, rtol: float = LOSS_RTOL) -> None:
    got, ref = rows(run_dir), rows(ref_dir)
    assert [(r["stage"], r["step"], "loss" in r) for r in got] == [(r["stage"], r["step"], "loss" in r) for r in ref]
    for g, r in zip(got, ref):
        if "loss" in r:
            assert g["loss"] == pytest.approx(r["loss"], rel=rtol), (g, r)
            assert g["supervised_tokens"] == r["supervised_tokens"]  # the global count, on every rank
            assert g["lr"] == pytest.approx(r["lr"], rel=1e-9)
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
        if "val_loss" in r:
            assert g["val_loss"] == pytest.approx(r["val_loss"], rel=rtol)


def stop_then_resume(tmp_path: Path, run_dir: Path, extra: list[str], stop: int = 2) -> subprocess.CompletedProcess:
    """2 processes stopped after ``stop`` steps (their checkpoint), then the same command line resumes them."""
    script = tmp_path / "stop_after.py"
    script.write_text(STOP_SCRIPT.format(recipe=RECIPE))
    run(torchrun(str(script), str(run_dir), "instruct", str(stop), *SHORT, *extra))
    partial = losses(run_dir)
    assert [s for _, s, _ in partial] == list(range(1, stop + 1))
    state = json.loads((run_dir / "checkpoints/instruct/last/state.json").read_text())
    assert state["step"] == stop and state["distributed"]["world_size"] == 2
    return run(torchrun(*cli(*SHORT, *extra, "--run-dir", str(run_dir))))


@pytest.fixture(scope="module")
def reference(tiny_toy_world, tmp_path_factory):
    """The single-process run every strategy is compared with."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run([sys.executable, *cli(*SHORT, "--run-dir", str(run_dir))])
    return run_dir


# ---- fast checks (no processes started) ---------------------------------------------------------------------------
def test_rank_slices_partition_each_global_micro_batch():
    from vlkit.distributed import shard_batch

    for idx in ([3, 1, 4, 1, 5, 9, 2], [7, 8], [5]):
        for world in (1, 2, 3, 4):
            parts = [shard_batch(idx, r, world) for r in range(world)]
            real = [p for p, dummy in parts if not dummy]
            assert sorted(i for p in real for i in p) == sorted(idx)  # the union is the single-process batch
            assert all(p == [idx[0]] for p, dummy in parts if dummy)  # idle ranks run one sample at weight 0


def test_launch_settings_resolve_and_fail_clearly():
    from vlkit.config import load_recipe
    from vlkit.distributed import DistributedError, resolve_mode

    assert resolve_mode("auto", 1, None) == "none" and resolve_mode("auto", 4, None) == "ddp"
    assert resolve_mode("ddp", 1, None) == "none"
    with pytest.raises(DistributedError, match="WORLD_SIZE=2.*train.distributed=none"):
        resolve_mode("none", 2, None)
    # launch settings do not change what a run computes, so not its identity (a run resumes on other hardware)
    a = load_recipe(RECIPE, [])
    b = load_recipe(RECIPE, ["train.distributed=deepspeed", "train.deepspeed.zero_stage=3"])
    assert a.identity() == b.identity() and b.train.deepspeed == {"zero_stage": 3}


def test_deepspeed_config_is_checked_and_filled_from_the_stage(tmp_path):
    from vlkit.config import ConfigError, load_recipe
    from vlkit.distributed import DistributedError, deepspeed_config_for_stage, read_deepspeed_config

    with pytest.raises(ConfigError, match=r"train\.deepspeed: remove the 'optimizer' section"):
        load_recipe(RECIPE, ["train.deepspeed.optimizer.type=Adam"])
    with pytest.raises(ConfigError, match="ZeRO stage must be 0, 1, 2 or 3"):
        load_recipe(RECIPE, ["train.deepspeed.zero_stage=4"])
    assert read_deepspeed_config(None)["zero_optimization"]["stage"] == 2  # the default
    assert read_deepspeed_config({"zero_stage": 3})["zero_optimization"] == {"stage": 3}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": True}}))
    cfg = deepspeed_config_for_stage(read_deepspeed_config(str(path)), micro=8, grad_accum=4, world=2,
                                     max_grad_norm=1.0, trainable=10_000)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32 and cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(DistributedError, match="gradient_accumulation_steps=2 but the stage needs 4"):
        deepspeed_config_for_stage({"gradient_accumulation_steps": 2}, 8, 4, 2, 1.0, 10_000)
    with pytest.raises(DistributedError, match="not found"):
        read_deepspeed_config(str(tmp_path / "missing.json"))


def test_fsdp_without_reduce_scatter_names_the_requirement(monkeypatch):
    import torch

    from vlkit import distributed
    from vlkit.distributed import fsdp

    monkeypatch.setattr(fsdp, "_gloo_reduce_scatter", lambda: False)
    with pytest.raises(distributed.DistributedError, match="fsdp needs CUDA GPUs with NCCL"):
        distributed.fsdp_supported(torch.device("cpu"))


# ---- 2 processes --------------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_one_and_resume(reference, tmp_path):
    run_dir = tmp_path / "ddp"
    res = stop_then_resume(tmp_path, run_dir, [])
    assert "resuming stage 'instruct' at step 2" in res.stdout and "ddp over 2 processes" in res.stdout
    assert res.stdout.count("done:") == 1  # rank 0 alone prints
    assert_same_run(run_dir, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["distributed"] == {"mode": "ddp", "world_size": 2}
    assert (run_dir / "checkpoints/instruct/final/trainable.safetensors").exists()
    assert not list(run_dir.glob("**/.*.old"))  # rank 0 wrote each checkpoint once, atomically


@needs_deepspeed
def test_deepspeed_zero2_matches_one_process_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "zero2"
    res = stop_then_resume(tmp_path, run_dir, ["train.distributed=deepspeed", "train.deepspeed.zero_stage=2"])
    assert "resuming stage 'instruct' at step 2" in res.stdout and "optimizer state starts fresh" not in res.stdout
    assert_same_run(run_dir, reference)
    state = json.loads((run_dir / "checkpoints/instruct/last/state.json").read_text())
    assert state["distributed"]["optimizer"] == "deepspeed"
    assert (run_dir / "checkpoints/instruct/deepspeed" / state["distributed"]["deepspeed_tag"]).is_dir()
    assert len([p for p in (run_dir / "checkpoints/instruct/deepspeed").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_matches_one_process(reference, tmp_path):
    """ZeRO-3 partitions the (mostly frozen) weights: the optimizer gets the trainable ones only; after the stage
    a fresh model takes the gathered weights and rank 0 evaluates it."""
    run_dir = tmp_path / "zero3"
    run(torchrun(*cli(*SHORT, "train.distributed=deepspeed", "train.deepspeed.zero_stage=3", "--run-dir",
                      str(run_dir))))
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_fsdp_matches_one_process(reference, tmp_path):
    run_dir = tmp_path / "fsdp"
    run(torchrun(*cli(*SHORT, "train.distributed=fsdp", "--run-dir", str(run_dir))))
    assert_same_run(run_dir, reference)
