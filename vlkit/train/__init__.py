"""``vlkit train``: the LLaVA recipe as a package, each module one job.

    run.py          train(): the run directory, the summary, the stages in order
    stage.py        run_stage(): one stage's loop, a recipe that reads top to bottom
    data.py         a stage's data: checks, bad images, pre-flight, the feature cache, the micro-batch stream
    setup.py        seeds and threads, precision, what trains, optimizer and schedule
    evaluation.py   evaluation during and after a stage
    metrics_log.py  metrics.jsonl
    summary.py      the run directory and summary.json
    accuracy.py     the per-question-type accuracy table printed after a stage
"""
from vlkit.train.accuracy import print_accuracy
from vlkit.train.data import (BadImages, MicroBatchStream, Position, StageData, TrainingError, estimate_steps,
                              images_read, load_stage_data, micro_batch_size, preflight, stage_steps)
from vlkit.train.evaluation import eval_row, final_eval, run_eval
from vlkit.train.metrics_log import MetricsLog, NullLog
from vlkit.train.run import rebuild_model, train
from vlkit.train.setup import (autocast_dtype, build_optimizer, cosine_with_warmup, lr_schedule, param_groups,
                               pin_threads, seed_everything, set_trainable)
from vlkit.train.stage import StageResult, run_stage
from vlkit.train.summary import clear_run_dir, default_run_dir, load_summary, prepare_run_dir, recorded_stages, stage_metrics_path

__all__ = [
    "BadImages", "MetricsLog", "MicroBatchStream", "NullLog", "Position", "StageData", "StageResult", "TrainingError",
    "autocast_dtype", "build_optimizer", "clear_run_dir", "cosine_with_warmup", "default_run_dir", "estimate_steps", "eval_row",
    "final_eval", "images_read", "load_stage_data", "load_summary", "lr_schedule", "micro_batch_size", "param_groups", "pin_threads",
    "preflight", "prepare_run_dir", "print_accuracy", "rebuild_model", "recorded_stages", "run_eval", "run_stage",
    "seed_everything", "set_trainable", "stage_metrics_path", "stage_steps", "train",
]
