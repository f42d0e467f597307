"""Registries: built-ins, entry-point plugins (found from installed metadata), broken and clashing plugins."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlkit.registry import ENCODERS, FAMILIES, PROJECTORS, TOKEN_STRATEGIES, PluginLoadError, RegistryError


def make_dist(root: Path, dist: str, version: str, module: str, source: str, entry_points: dict[str, dict[str, str]]):
    """A package 'installed' on a sys.path folder: its module plus a dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


PLUGIN_SRC = """
    import torch
    from torch import nn
    from vlkit import EncoderOutput

    class Tiny(nn.Module):
        embed_dim, image_size, mean, std = 16, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        def __init__(self, width=16):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 8, 8)
        def forward(self, x):  # [B, 3, 32, 32] -> patches [B, 16, D]
            f = self.conv(x)
            p = f.flatten(2).transpose(1, 2)
            return EncoderOutput(cls=p.mean(1), patches=p, grid=(4, 4))

    class Every2(nn.Module):
        def forward(self, features):  # [B, N, D] -> [B, N/2, D]
            return features.patches[:, ::2]

    class Sum(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.lin = nn.Linear(in_dim, out_dim)
        def forward(self, x):  # [B, N, in] -> [B, 1, out]
            return self.lin(x).sum(1, keepdim=True)

    def tiny_encoder(**params):
        return Tiny(**params)

    def every_second(num_tokens=None, **params):
        return Every2()

    def sum_projector(in_dim, out_dim, num_tokens=None, **params):
        return Sum(in_dim, out_dim)
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    make_dist(tmp_path, "vlkit-extra", "1.2.3", "vlkit_extra", PLUGIN_SRC, {
        "vlkit.encoders": {"tiny_conv": "vlkit_extra:tiny_encoder"},
        "vlkit.token_strategies": {"every_second": "vlkit_extra:every_second"},
        "vlkit.projectors": {"sum_proj": "vlkit_extra:sum_projector"},
    })
    make_dist(tmp_path, "vlkit-broken", "0.1", "vlkit_broken", "raise ImportError('needs libfoo')\n",
              {"vlkit.projectors": {"broken_proj": "vlkit_broken:factory"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VLKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    for reg in FAMILIES.values():
        reg.refresh()
    yield tmp_path
    sys.modules.pop("vlkit_extra", None)
    sys.modules.pop("vlkit_broken", None)
    for reg in FAMILIES.values():
        reg.refresh()


def test_builtins_listed():
    assert {"cls", "patch", "cls_patch", "pooled", "merged"} <= set(TOKEN_STRATEGIES.list())
    assert {"linear", "mlp", "cross_attention", "cls_reshape"} <= set(PROJECTORS.list())
    assert {"timm_vit", "timm_convnext", "open_clip", "hf_clip", "hf_siglip"} <= set(ENCODERS.list())
    assert PROJECTORS.list("c*") == sorted(n for n in PROJECTORS.list() if n.startswith("c"))


def test_unknown_name_suggests():
    with pytest.raises(RegistryError, match=r"Did you mean 'mlp'\?.*linear"):
        PROJECTORS.create("mpl", in_dim=4, out_dim=4)


def test_bad_param_suggests():
    with pytest.raises(RegistryError, match=r"no parameter 'dept'. Did you mean 'depth'"):
        PROJECTORS.create("mlp", in_dim=4, out_dim=4, dept=3)


def test_plugin_discovered_and_built(plugin_path):
    assert "sum_proj" in PROJECTORS.list()
    assert PROJECTORS.source("sum_proj") == "vlkit-extra 1.2.3"
    assert "vlkit_extra" not in sys.modules  # found from metadata only, not imported yet
    proj = PROJECTORS.create("sum_proj", in_dim=16, out_dim=8, num_tokens=None, anything=1)  # **params: passed on
    assert proj(torch.randn(2, 5, 16)).shape == (2, 1, 8)
    enc = ENCODERS.create("tiny_conv", width=16)
    out = enc(torch.randn(2, 3, 32, 32))
    tok = TOKEN_STRATEGIES.create("every_second", num_tokens=None)
    assert tok(out).shape == (2, 8, 16)


def test_broken_plugin_reported_not_fatal(plugin_path):
    # listing works and shows the error; other components still build
    entries = {e.name: e for e in PROJECTORS.entries()}
    assert "needs libfoo" in entries["broken_proj"].error
    assert entries["sum_proj"].error is None
    with pytest.raises(PluginLoadError, match=r"broken_proj.*vlkit-broken 0.1.*needs libfoo") as info:
        PROJECTORS.get("broken_proj")
    assert isinstance(info.value.__cause__, ImportError)
    assert PROJECTORS.create("linear", in_dim=2, out_dim=2) is not None


def test_name_clash_is_an_error(plugin_path):
    make_dist(plugin_path, "vlkit-other", "2.0", "vlkit_other", "def f(**k):\n    return None\n",
              {"vlkit.projectors": {"sum_proj": "vlkit_other:f", "mlp": "vlkit_other:f"}})
    PROJECTORS.refresh()
    with pytest.raises(RegistryError, match=r"more than one package: vlkit-extra 1.2.3, vlkit-other 2.0"):
        PROJECTORS.get("sum_proj")
    with pytest.raises(RegistryError, match=r"clashes with vlkit's built-in"):
        PROJECTORS.get("mlp")


def test_autoload_switch(plugin_path, monkeypatch):
    monkeypatch.setenv("VLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    PROJECTORS.refresh()
    assert "sum_proj" not in PROJECTORS.list()
    assert "mlp" in PROJECTORS.list()


def test_cli_list_shows_plugins_and_broken(plugin_path):
    env = {**os.environ, "PYTHONPATH": f"{plugin_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "250"}
    env.pop("VLKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    res = subprocess.run([sys.executable, "-m", "vlkit.cli", "list"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "sum_proj" in res.stdout and "vlkit-extra 1.2.3" in res.stdout
    assert "broken_proj" in res.stdout and "needs libfoo" in res.stdout
    assert "cross_attention" in res.stdout and "built-in" in res.stdout
