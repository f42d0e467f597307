"""The `merged` token strategy: patches concatenated block by block (pixel shuffle), not averaged."""
import pytest
import torch

from vlkit.components.tokens import MergedTokens
from vlkit.config import load_recipe
from vlkit.model import build_vision
from vlkit.registry import TOKEN_STRATEGIES
from vlkit.types import EncoderOutput


def _features(h: int, w: int, d: int, b: int = 2) -> EncoderOutput:
    patches = torch.arange(b * h * w * d, dtype=torch.float32).reshape(b, h * w, d)
    return EncoderOutput(patches=patches, cls=None, grid=(h, w))


def test_a_divisible_grid_is_concatenated_block_by_block_in_row_major_order():
    f = _features(4, 4, 3)
    m = MergedTokens(4, (4, 4))
    out = m(f)  # [2, 4, 2*2*3]
    assert out.shape == (2, 4, 12) and m.out_dim(3) == 12 and m.token_grid((4, 4)) == (2, 2)
    grid = f.patches.reshape(2, 4, 4, 3)
    for token, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        block = torch.cat([grid[:, r, c], grid[:, r, c + 1], grid[:, r + 1, c], grid[:, r + 1, c + 1]], dim=-1)
        assert torch.equal(out[:, token], block)


def test_one_token_per_patch_is_the_patches_themselves():
    f = _features(8, 8, 5)
    assert torch.equal(MergedTokens(64, (8, 8))(f), f.patches)


def test_a_grid_the_tokens_do_not_divide_is_resampled_so_each_token_covers_its_own_region():
    # 8 x 8 patches to 3 x 3 tokens: resampled to 9 x 9, each token concatenates a 3 x 3 block (9 * D dims)
    d = 4
    patches = torch.zeros(1, 8, 8, d)
    patches[0, :3, :3] = 1.0  # a feature only in the top-left corner of the patch grid
    f = EncoderOutput(patches=patches.reshape(1, 64, d), cls=None, grid=(8, 8))
    m = MergedTokens(9, (8, 8))
    out = m(f)
    assert out.shape == (1, 9, 9 * d) and m.out_dim(d) == 9 * d and m.block == (3, 3)
    assert out[0, 0].min() > 0.5          # the top-left token sees it everywhere in its block
    assert out[0, [2, 5, 6, 7, 8]].abs().max() == 0  # tokens of regions that hold none of it are 0
    constant = EncoderOutput(patches=torch.full((1, 64, d), 2.0), cls=None, grid=(8, 8))
    assert torch.allclose(m(constant), torch.full((1, 9, 9 * d), 2.0))


def test_merged_needs_a_square_count_and_the_grid_it_was_built_for():
    with pytest.raises(ValueError, match="needs tokens.num_tokens"):
        TOKEN_STRATEGIES.create("merged", num_tokens=None, grid=(8, 8))
    with pytest.raises(ValueError, match="'merged' needs a square num_tokens"):
        TOKEN_STRATEGIES.create("merged", num_tokens=8, grid=(8, 8))
    with pytest.raises(ValueError, match="fixed 2-D patch grid"):
        TOKEN_STRATEGIES.create("merged", num_tokens=9, grid=None)
    with pytest.raises(ValueError, match="built for the encoder's 8 x 8 patch grid"):
        MergedTokens(9, (8, 8))(_features(4, 4, 2))


def test_the_builder_passes_the_encoders_grid_and_the_projector_takes_the_merged_width(tiny_toy_world):
    encoder, tokens, projector = build_vision(
        load_recipe("mlp_patch", ["tokens.name=merged", "tokens.num_tokens=9"]), out_dim=8)
    assert tokens.grid == tuple(encoder.grid)
    with torch.no_grad():
        out = projector(tokens(encoder(torch.zeros(2, 3, encoder.image_size, encoder.image_size))))
    assert out.shape == (2, 9, 8)
    assert projector.net[0].in_features == tokens.out_dim(encoder.embed_dim)


def test_a_non_square_grid_merges_rows_and_columns_apart():
    # 4 x 6 patches to 2 x 2 tokens: blocks of 2 rows x 3 columns; token 0 = patches 0, 1, 2 (row 0) then 6, 7, 8
    f = _features(4, 6, 1, b=1)
    m = MergedTokens(4, (4, 6))
    out = m(f)
    assert m.block == (2, 3) and out.shape == (1, 4, 6)
    assert out[0, 0].tolist() == [0, 1, 2, 6, 7, 8] and out[0, 1].tolist() == [3, 4, 5, 9, 10, 11]
    assert out[0, 2].tolist() == [12, 13, 14, 18, 19, 20]


def test_zero_tokens_and_a_user_set_grid_are_refused():
    with pytest.raises(ValueError, match="square num_tokens"):
        MergedTokens(0, (8, 8))
    from vlkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"tokens\.grid: set by vlkit"):
        load_recipe("mlp_patch", ["tokens.name=merged", "tokens.num_tokens=9", "tokens.grid=[8,8]"])


def test_the_planner_sizes_a_merged_projector_from_the_encoders_grid(monkeypatch):
    """`vlkit plan` builds the token strategy itself (no weights): it passes the grid too, so the real recipe's
    24 x 24 CLIP-L/14-336 patches merged to 144 tokens give 2 x 2 blocks of 1 024 dims."""
    from vlkit.plan import plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = load_recipe("recipes/llava15_qwen2.5-1.5b_clip-l336.yaml", ["tokens.name=merged", "tokens.num_tokens=144"])
    p = plan(real, ["instruct"], online=False, gpus=1, zero=0)
    assert p.vision.image_tokens == 144
    hidden = 1536  # Qwen2.5-1.5B
    assert p.vision.projector_params == 4 * 1024 * hidden + hidden + hidden * hidden + hidden
