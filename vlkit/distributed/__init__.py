"""Multi-process training: DDP, DeepSpeed ZeRO (1/2/3) and FSDP2 behind one small interface used by ``run_stage``.

Launch ``vlkit train`` with ``torchrun``, the ``deepspeed`` launcher, or ``srun`` (setting RANK/WORLD_SIZE/LOCAL_RANK);
:func:`setup` reads those variables, starts the process group (NCCL on GPUs, gloo on CPUs) and puts each process on
``cuda:LOCAL_RANK``. The recipe picks the strategy with ``train.distributed`` (``auto``: DDP when launched with more
than one process, else a single process).

What stays the same as one process, by construction:

* **Data.** The sampler yields the same *global* micro-batches from (seed, epoch); rank r takes ``batch[r::world]``,
  so the union over ranks is the single-process micro-batch. A rank whose slice is empty (a global micro-batch
  smaller than the world) runs one sample with weight 0, so every rank takes part in every collective.
* **Loss.** Token-weighted over the global batch: the supervised-token count of the whole optimizer step (all
  micro-batches, all ranks) is all-reduced before the backward passes; each rank back-propagates
  ``world * loss_sum / N_global`` because DDP, ZeRO and FSDP *average* gradients over ranks. The logged loss is the
  all-reduced sum over N_global, i.e. the single-process number (up to float summation order).
* **Outputs.** Only rank 0 writes logs, ``metrics.jsonl``, summaries and checkpoints and shows progress; every rank
  loads checkpoints on resume. Evaluation runs on rank 0 while the others wait at a barrier.

Checkpoints. DDP and FSDP write vlkit's own format (``trainable.safetensors`` gathered on rank 0, ``optimizer.pt``:
the torch state for DDP, a full name-keyed state from ``torch.distributed.checkpoint.state_dict`` for FSDP).
DeepSpeed writes vlkit's ``trainable.safetensors`` + ``state.json`` (so ``predict``/``eval``/``export`` read any run
the same way) and keeps its partitioned optimizer state next to it with DeepSpeed's own ``save_checkpoint``
(``checkpoints/<stage>/deepspeed/<tag>``, the tag named in ``state.json``; resume needs the same number of
processes for it, else only the weights are restored, with a warning).

Sharded strategies (FSDP, ZeRO-3) leave the model's weights split across ranks; after such a stage the trainer
builds a fresh model and loads the finished stages' weights (:func:`vlkit.train.rebuild_model`), and the stage's
final evaluation runs on that copy (evaluation *during* such a stage, ``eval_every``, is skipped).

Modules: context.py (the process's place, batch sharding, the strategy asked for), engine.py (the interface
``run_stage`` trains through, single process), ddp.py, fsdp.py, deepspeed_zero.py (one per strategy), launch.py
(:func:`setup` joins the job, :func:`make_engine` wraps a stage).
"""
from vlkit.deepspeed_config import deepspeed_config_problems
from vlkit.distributed.context import (MODES, TIMEOUT, DistContext, DistributedError, check_same_modules, launch_env,
                                       resolve_mode, shard_batch)
from vlkit.distributed.ddp import DDPEngine
from vlkit.distributed.deepspeed_zero import DeepSpeedEngine, deepspeed_config_for_stage, read_deepspeed_config
from vlkit.distributed.engine import StageEngine, TrainableView
from vlkit.distributed.fsdp import FSDPEngine, fsdp_supported
from vlkit.distributed.launch import make_engine, setup

__all__ = [
    "MODES", "TIMEOUT", "DDPEngine", "DeepSpeedEngine", "DistContext", "DistributedError", "FSDPEngine", "StageEngine",
    "TrainableView", "check_same_modules", "deepspeed_config_for_stage", "deepspeed_config_problems",
    "fsdp_supported", "launch_env", "make_engine", "read_deepspeed_config", "resolve_mode", "setup", "shard_batch",
]
