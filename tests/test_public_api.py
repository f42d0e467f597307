"""The public surface stays where users and plugins find it: the imports docs/plugins.md and the README show, the
``vlkit`` console script (``vlkit.cli:app`` in pyproject.toml), ``python -m vlkit.cli``, and every command's flags.
A rename or move that breaks one of these fails here, by name."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    # the plugin contract (docs/plugins.md) and the package root
    "vlkit": ["ConfigError", "EncoderOutput", "Recipe", "load_recipe", "create_encoder", "create_llm",
              "create_projector", "create_token_strategy", "list_encoders", "list_llms", "list_projectors",
              "list_token_strategies", "register_encoder", "register_llm", "register_projector",
              "register_token_strategy", "__version__"],
    "vlkit.registry": ["ENCODERS", "LLMS", "PROJECTORS", "TOKEN_STRATEGIES", "FAMILIES", "Registry", "RegistryError",
                       "PluginLoadError", "suggest"],
    "vlkit.types": ["EncoderOutput"],
    "vlkit.config": ["ConfigError", "Recipe", "StageConfig", "load_recipe", "dump_recipe", "RECIPES_DIR", "work_identity"],
    # the library entry points the README and the commands use
    "vlkit.model": ["VLM", "build_model", "parameter_counts", "resolve_ref"],
    "vlkit.train": ["train", "run_stage", "StageResult", "TrainingError", "MetricsLog", "print_accuracy",
                    "default_run_dir", "prepare_run_dir", "estimate_steps", "images_read", "param_groups",
                    "set_trainable", "rebuild_model"],
    "vlkit.distributed": ["DistContext", "DistributedError", "StageEngine", "make_engine", "setup", "shard_batch",
                          "resolve_mode", "read_deepspeed_config", "deepspeed_config_for_stage", "fsdp_supported",
                          "check_same_modules"],
    "vlkit.runs": ["load_run", "load_run_tracked", "pick_device", "attach_lora"],
    "vlkit.predict": ["load_run", "predict_records", "evaluate_run"],
    "vlkit.export": ["export_run", "load_export", "load_model"],
    "vlkit.evaluate": ["evaluate"],
    "vlkit.cache": ["FeatureCache"],
    "vlkit.plan": ["plan", "print_plan"],
    "vlkit.toyworld": ["build_toy_world", "pretrain", "toy_world_of"],
    "vlkit.ablate.plan": ["make_plan", "print_grid_plan", "estimate_time", "adopt_reusable"],
    "vlkit.ablate.reuse": ["find_reusable", "check_run_dirs", "adopt_run", "relabel"],
    "vlkit.ablate.run": ["run_grid"],
    "vlkit.ablate.report": ["write_report"],
    "vlkit.ablate.results": ["collect", "load_plan", "study_rows"],
    "vlkit.ablate.expect": ["parse_expectation", "resolve", "check_expectations", "ExpectationError"],
    "vlkit.ablate.findings": ["Finding", "findings_for", "judge"],
    "vlkit.ablate.stats": ["paired_test", "mean_ci", "holm", "tost_p", "pairs_needed", "number"],
    "vlkit.cli": ["app"],
}

# every command and its parameters (options as flags, arguments by name), as `vlkit --help` offers them
COMMANDS = {
    'ablate': ['--compare', '--dry-run', '--executor', '--feature-cache', '--gpus', '--grid', '--no-feature-cache', '--num-image-tokens', '--out', '--partition', '--projector', '--reuse', '--seeds', '--time', '--tokens', '--workers', 'overrides', 'recipe'],
    'config': ['overrides', 'recipe'],
    'data check': ['--image-root', '--recipe', '--show', '--workers', 'file', 'overrides'],
    'data toy': ['--grid', '--image-size', '--max-objects', '--n-test', '--n-train', '--n-val', '--out', '--seed'],
    'eval': ['--batch-size', '--data', '--image-root', '--max-new-tokens', '--max-samples', '--predictions', 'run'],
    'export': ['--dtype', '--format', '--overwrite', 'out', 'run'],
    'inspect': ['--stage', 'overrides', 'recipe'],
    'list': ['--pattern', 'family'],
    'plan': ['--device', '--gpu-memory', '--gpus', '--json', '--micro-batch', '--offline', '--overhead-gb', '--seq-len', '--stage', '--supervised-frac', '--zero', 'overrides', 'recipe'],
    'predict': ['--batch', '--image', '--image-root', '--max-new-tokens', '--no-sample', '--out', '--prompt', '--sample', '--temperature', '--top-p', 'run'],
    'report': ['--compare', 'out'],
    'toy build': ['--cache-dir', '--force', '--no-force', '--preset'],
    'toy pretrain': ['--out', '--preset', '--restart', '--reuse', '--seed'],
    'train': ['--dry-run', '--feature-cache', '--fresh', '--no-feature-cache', '--run-dir', 'overrides', 'recipe']
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_from_where_the_docs_show_them(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def test_console_script_entry_is_the_typer_app():
    import typer

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["vlkit"].partition(":")
    assert (module, attr) == ("vlkit.cli", "app")
    assert isinstance(getattr(importlib.import_module(module), attr), typer.Typer)


def test_every_command_keeps_its_flags():
    import typer.main

    from vlkit.cli import app

    def walk(command, prefix):
        if hasattr(command, "commands"):
            return {k: v for name, sub in command.commands.items() for k, v in walk(sub, prefix + [name]).items()}
        return {" ".join(prefix): sorted(o for p in command.params for o in
                                         (p.opts + p.secondary_opts if p.param_type_name == "option" else [p.name]))}

    assert walk(typer.main.get_command(app), []) == COMMANDS


def test_python_m_vlkit_cli_runs_the_app_and_config_needs_no_distributed():
    """What torchrun and grid runs start; loading a recipe (with a DeepSpeed section) imports no vlkit.distributed."""
    res = subprocess.run([sys.executable, "-m", "vlkit.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train" in res.stdout, res.stderr
    code = ("import sys; from vlkit.config import load_recipe; "
            "load_recipe('mlp_patch', ['train.deepspeed={zero_stage: 2}']); "
            "print(sorted(m for m in sys.modules if m.startswith(('vlkit.distributed', 'vlkit.ablate'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
