import pytest
import torch

from fcmae.masking import apply_keep, check_mask, grid_size, random_mask


@pytest.mark.parametrize("grid", [(7, 7), (2, 3), (1, 5)])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.75, 0.99])
def test_keeps_exactly_int_L_times_1_minus_ratio(grid, ratio):
    mask = random_mask(6, grid, ratio)
    num_patches = grid[0] * grid[1]
    assert mask.shape == (6, num_patches) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = (mask == 0).sum(dim=1)
    assert (kept == int(num_patches * (1 - ratio))).all()


def test_matches_the_official_argsort_of_gaussian_noise():
    torch.manual_seed(3)
    mask = random_mask(4, (7, 7), 0.6)
    torch.manual_seed(3)  # the official gen_random_mask, step by step
    noise = torch.randn(4, 49)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    official = torch.ones(4, 49)
    official[:, : int(49 * 0.4)] = 0
    official = torch.gather(official, 1, ids_restore)
    assert torch.equal(mask, official)


def test_generator_makes_masks_reproducible_without_touching_global_rng():
    state = torch.get_rng_state()
    a = random_mask(3, (4, 5), 0.6, generator=torch.Generator().manual_seed(7))
    b = random_mask(3, (4, 5), 0.6, generator=torch.Generator().manual_seed(7))
    c = random_mask(3, (4, 5), 0.6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_masks_differ_between_samples():
    mask = random_mask(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask}) == 8


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_a_value_error(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_mask(2, (7, 7), ratio)


def test_grid_size():
    assert grid_size(224) == (7, 7)
    assert grid_size((256, 96)) == (8, 3)
    for bad in [(100, 224), 0, (224, 33)]:
        with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
            grid_size(bad)


def test_check_mask_rejects_wrong_shapes_and_values():
    assert check_mask(torch.zeros(2, 6, dtype=torch.bool), 2, (2, 3)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\), expected \(2, 6\)"):
        check_mask(torch.zeros(2, 5), 2, (2, 3))
    with pytest.raises(ValueError, match="0 \\(keep\\) or 1 \\(remove\\)"):
        check_mask(torch.full((2, 6), 0.5), 2, (2, 3))


def test_apply_keep_zeroes_whole_removed_patches():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])  # 2x3 grid
    x = torch.randn(1, 8, 12, 5)  # 4x4 sites per patch
    y = apply_keep(x, mask, (2, 3))
    for index, removed in enumerate(mask[0].tolist()):
        r, c = divmod(index, 3)
        block = y[0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]
        expected = torch.zeros_like(block) if removed else x[0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]
        assert torch.equal(block, expected)
