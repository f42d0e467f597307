"""Tests of the vlkit-honeybee example plugin: component shapes/gradients/errors, then discovery through vlkit.

The discovery tests need the plugin *installed* (``pip install plugins/vlkit-honeybee``) so that its entry points
exist; they are skipped with a clear reason otherwise.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

try:
    import vlkit_honeybee  # noqa: F401  (the installed package, as a user has it)
except ImportError:  # not installed (e.g. a fresh checkout): test the source tree; discovery tests then skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlkit_honeybee.encoders import TinyCNN, tiny_cnn
from vlkit_honeybee.projectors import CAbstractor, c_abstractor
from vlkit_honeybee.tokens import PixelShuffle, pixel_shuffle

from vlkit import EncoderOutput


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _all_params_have_grad(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


# ---- c_abstractor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens, expected", [(4, 4), (1, 1), (None, 16), (9, 9)])
def test_c_abstractor_shapes_and_backward(num_tokens: int | None, expected: int) -> None:
    proj = c_abstractor(in_dim=8, out_dim=12, num_tokens=num_tokens)
    assert isinstance(proj, CAbstractor)
    x = torch.randn(2, 16, 8, requires_grad=True)
    y = proj(x)
    assert y.shape == (2, expected, 12)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    _all_params_have_grad(proj)


def test_c_abstractor_options() -> None:
    proj = c_abstractor(in_dim=6, out_dim=10, num_tokens=4, depth=1, hidden_dim=5, mlp_depth=3)
    assert proj(torch.randn(1, 36, 6)).shape == (1, 4, 10)
    assert sum(isinstance(m, torch.nn.Linear) for m in proj.readout) == 3
    flat = c_abstractor(in_dim=6, out_dim=10, num_tokens=None, depth=0)  # no convolutions: pooling + MLP only
    assert flat(torch.randn(1, 9, 6)).shape == (1, 9, 10)


def test_c_abstractor_is_local() -> None:
    """Each output cell depends only on its own region of the grid when depth=0 (pooling + per-token MLP)."""
    proj = c_abstractor(in_dim=4, out_dim=4, num_tokens=4, depth=0)
    x = torch.randn(1, 16, 4)
    x2 = x.clone()
    x2[0, 0] += 10.0  # top-left patch of the 4x4 grid -> top-left output cell only
    diff = (proj(x2) - proj(x)).abs().sum(-1)[0]
    assert diff[0] > 0 and torch.all(diff[1:] == 0)


def test_c_abstractor_errors() -> None:
    proj = c_abstractor(in_dim=8, out_dim=8, num_tokens=4)
    with pytest.raises(ValueError, match="c_abstractor.*square"):
        proj(torch.randn(1, 15, 8))
    with pytest.raises(ValueError, match="c_abstractor"):
        proj(torch.randn(1, 16, 7))
    with pytest.raises(ValueError, match="c_abstractor.*num_tokens.*square"):
        c_abstractor(in_dim=8, out_dim=8, num_tokens=5)


# ---- pixel_shuffle --------------------------------------------------------------------------------------------
def _features(b: int, h: int, w: int, d: int, grid: bool = True, requires_grad: bool = False) -> EncoderOutput:
    patches = torch.randn(b, h * w, d, requires_grad=requires_grad)
    return EncoderOutput(patches=patches, cls=torch.randn(b, d), grid=(h, w) if grid else None)


def test_pixel_shuffle_default_scale_shapes_and_backward() -> None:
    strat = pixel_shuffle(num_tokens=None)
    assert isinstance(strat, PixelShuffle) and strat.scale_factor == 2
    assert strat.out_dim(3) == 12
    feats = _features(2, 4, 6, 3, requires_grad=True)
    y = strat(feats)
    assert y.shape == (2, 6, 12)
    y.sum().backward()
    assert torch.equal(feats.patches.grad, torch.ones_like(feats.patches))  # a pure permutation of the inputs


def test_pixel_shuffle_values() -> None:
    """Token (i, j) of the output holds patches (s*i + a, s*j + b) for a, b in 0..s-1, row-major."""
    h, w, d, s = 4, 4, 2, 2
    feats = _features(1, h, w, d)
    y = pixel_shuffle(scale_factor=s)(feats)
    grid = feats.patches[0].reshape(h, w, d)
    for i in range(h // s):
        for j in range(w // s):
            expected = torch.cat([grid[s * i + a, s * j + b] for a in range(s) for b in range(s)])
            assert torch.equal(y[0, i * (w // s) + j], expected)


def test_pixel_shuffle_scale_from_num_tokens() -> None:
    strat = pixel_shuffle(num_tokens=4)
    assert strat(_features(1, 8, 8, 3)).shape == (1, 4, 48)  # s = sqrt(64 / 4) = 4
    assert strat(_features(1, 4, 4, 3)).shape == (1, 4, 12)  # s = 2 on a smaller grid
    both = pixel_shuffle(num_tokens=16, scale_factor=2)
    assert both.out_dim(5) == 20
    assert both(_features(1, 8, 8, 5)).shape == (1, 16, 20)


def test_pixel_shuffle_errors() -> None:
    with pytest.raises(ValueError, match="pixel_shuffle.*grid=None"):
        pixel_shuffle()(_features(1, 4, 4, 3, grid=False))
    with pytest.raises(ValueError, match="pixel_shuffle.*not divisible"):
        pixel_shuffle(scale_factor=2)(_features(1, 3, 4, 3))
    with pytest.raises(ValueError, match="pixel_shuffle.*num_tokens=5"):
        pixel_shuffle(num_tokens=5)(_features(1, 4, 4, 3))
    with pytest.raises(ValueError, match="pixel_shuffle.*num_tokens=8"):
        pixel_shuffle(num_tokens=8, scale_factor=2)(_features(1, 4, 4, 3))
    with pytest.raises(ValueError, match="pixel_shuffle.*scale_factor"):
        pixel_shuffle(num_tokens=4).out_dim(3)  # depends on the grid: ask for scale_factor
    with pytest.raises(ValueError, match="pixel_shuffle.*scale_factor"):
        pixel_shuffle(scale_factor=0)


# ---- tiny_cnn -------------------------------------------------------------------------------------------------
def test_tiny_cnn_contract_shapes_and_backward() -> None:
    enc = tiny_cnn(width=16, image_size=32)
    assert isinstance(enc, TinyCNN)
    assert enc.embed_dim == 16 and enc.image_size == 32 and enc.has_cls is False
    for stats in (enc.mean, enc.std):
        assert isinstance(stats, tuple) and len(stats) == 3 and all(isinstance(v, float) for v in stats)
    px = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = enc(px)
    assert isinstance(out, EncoderOutput)
    assert out.patches.shape == (2, 16, 16) and out.grid == (4, 4) and out.cls.shape == (2, 16)
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))
    (out.patches.sum() + out.cls.sum()).backward()
    assert px.grad is not None
    _all_params_have_grad(enc)


def test_tiny_cnn_defaults_and_errors() -> None:
    enc = tiny_cnn()
    assert enc.embed_dim == 64 and enc.image_size == 64
    assert enc(torch.randn(1, 3, 64, 64)).grid == (8, 8)
    with pytest.raises(ValueError, match="tiny_cnn"):
        tiny_cnn(image_size=30)
    with pytest.raises(ValueError, match="tiny_cnn"):
        enc(torch.randn(1, 1, 64, 64))


def test_components_chain() -> None:
    """tiny_cnn -> pixel_shuffle -> c_abstractor, with the projector sized through the strategy's out_dim."""
    enc = tiny_cnn(width=8, image_size=32)  # 4x4 grid
    strat = pixel_shuffle(scale_factor=2)  # -> 2x2 grid, 32 dims
    proj = c_abstractor(in_dim=strat.out_dim(enc.embed_dim), out_dim=24, num_tokens=1)
    y = proj(strat(enc(torch.randn(2, 3, 32, 32))))
    assert y.shape == (2, 1, 24)
    y.mean().backward()
    _all_params_have_grad(enc)


def test_token_grids_reach_vlkit_cell_names() -> None:
    """The optional ``token_grid`` of both components gives vlkit the output tokens' layout, so ``fusion.cells``
    can name grid cells: tiny_cnn's 8x8 -> pixel_shuffle 4x4 -> c_abstractor 3x3 (one token per cell)."""
    from vlkit.components.fusion import PrefixFusion
    from vlkit.model import token_grid

    enc = tiny_cnn(width=8, image_size=64)
    feats = enc(torch.randn(1, 3, 64, 64))
    strat = pixel_shuffle(scale_factor=2)
    proj = c_abstractor(in_dim=strat.out_dim(enc.embed_dim), out_dim=24, num_tokens=9)
    assert feats.grid == (8, 8) and strat.token_grid(feats.grid) == (4, 4) and proj.token_grid((4, 4)) == (3, 3)
    m = proj(strat(feats)).shape[1]
    grid = token_grid(strat, proj, feats.grid, m)
    assert grid == (3, 3)
    assert PrefixFusion([f"c{i}" for i in range(9)]).cell_groups(grid) == [[i] for i in range(9)]
    assert strat.token_grid(None) is None and proj.token_grid(None) is None
    assert c_abstractor(in_dim=8, out_dim=8).token_grid((4, 4)) == (4, 4)  # num_tokens=None keeps the grid


# ---- discovery through vlkit (needs the plugin installed) -----------------------------------------------------
def _installed() -> bool:
    try:
        metadata.distribution("vlkit-honeybee")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(
    not _installed(), reason="vlkit-honeybee is not installed; run `pip install plugins/vlkit-honeybee`"
)


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch):
    from vlkit.registry import DISABLE_ENV, ENCODERS, PROJECTORS, TOKEN_STRATEGIES

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    for reg in (ENCODERS, PROJECTORS, TOKEN_STRATEGIES):
        reg.refresh()
    yield ENCODERS, PROJECTORS, TOKEN_STRATEGIES
    for reg in (ENCODERS, PROJECTORS, TOKEN_STRATEGIES):
        reg.refresh()


@needs_install
def test_discovered_by_vlkit(registries) -> None:
    encoders, projectors, strategies = registries
    for reg, name in ((projectors, "c_abstractor"), (strategies, "pixel_shuffle"), (encoders, "tiny_cnn")):
        assert name in reg.list(), f"{name} not in {reg.list()}"
        assert reg.source(name).startswith("vlkit-honeybee"), reg.source(name)

    proj = projectors.create("c_abstractor", in_dim=8, out_dim=12, num_tokens=4)
    assert proj(torch.randn(1, 16, 8)).shape == (1, 4, 12)
    strat = strategies.create("pixel_shuffle", num_tokens=None, scale_factor=2)
    assert strat.out_dim(8) == 32
    enc = encoders.create("tiny_cnn", width=8, image_size=16)
    assert strat(enc(torch.randn(1, 3, 16, 16))).shape == (1, 1, 32)


@needs_install
def test_parameter_typos_are_reported_by_vlkit(registries) -> None:
    from vlkit.registry import RegistryError

    _, projectors, _ = registries
    with pytest.raises(RegistryError, match="depth"):
        projectors.create("c_abstractor", in_dim=8, out_dim=8, num_tokens=4, dpeth=1)


@needs_install
def test_swapped_in_over_the_default_it_is_told_about_out_norm(registries) -> None:
    """c_abstractor takes no out_norm: over the default (out_norm 'text', kept when the projector is swapped) vlkit
    refuses the recipe, naming this package and the fix; with the fix the recipe loads."""
    from vlkit.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"projector 'c_abstractor' \(vlkit-honeybee [^)]*\) takes no out_norm.*"
                                          r"add projector.out_norm=null"):
        load_recipe("mlp_patch", ["projector.name=c_abstractor", "projector.num_tokens=16", "tokens.name=patch"])
    recipe = load_recipe("mlp_patch", ["projector.name=c_abstractor", "projector.num_tokens=16", "tokens.name=patch",
                                       "projector.out_norm=null"])
    assert recipe.projector.name == "c_abstractor" and recipe.projector.params()["out_norm"] is None


@needs_install
def test_autoload_can_be_disabled(registries, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlkit.registry import DISABLE_ENV

    _, projectors, _ = registries
    monkeypatch.setenv(DISABLE_ENV, "1")
    projectors.refresh()
    assert "c_abstractor" not in projectors.list()
