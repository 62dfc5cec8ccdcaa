"""Reconstruction grids and the fcmae.visualize CLI."""

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import fcmae
from fcmae.visualize import main, reconstruct, reconstruction_grid, sample_indices
from helpers import SMALL, randomize_, write_photos


class Oracle(fcmae.FCMAE):
    """Predicts every patch perfectly in the loss's (norm-pix) target space."""

    def forward(self, imgs, mask=None):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return torch.zeros(()), target, mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_perfect_prediction_reconstructs_the_image(norm_pix):
    model = Oracle(fcmae.FCMAEConfig("custom", **SMALL, norm_pix_loss=norm_pix))
    imgs = torch.randn(2, 3, 64, 96)
    mask = model.random_masking(2, (2, 3))
    assert torch.allclose(reconstruct(model, imgs, mask), imgs, atol=1e-4)


def test_grid_layout_masks_and_pastes():
    model = Oracle(fcmae.FCMAEConfig("custom", **SMALL))
    imgs = torch.randn(3, 3, 64, 64) * 0.5
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    grid = reconstruction_grid(model, imgs, mask, labels=False)
    assert grid.shape == (3, 2 + 3 * 66, 2 + 5 * 66) and grid.min() >= 0 and grid.max() <= 1
    cell = lambda r, c: grid[:, 2 + r * 66 : 66 + r * 66, 2 + c * 66 : 66 + c * 66]  # noqa: E731
    masked = cell(0, 1)
    assert torch.allclose(masked[:, :32, :32], torch.full((3, 32, 32), 0.5))  # patch 0 removed: gray
    assert torch.allclose(masked[:, :32, 32:], cell(0, 0)[:, :32, 32:])  # patch 1 visible: original
    assert torch.allclose(cell(1, 3), cell(1, 0), atol=1e-4)  # perfect recon pasted = original
    labeled = reconstruction_grid(model, imgs, mask)
    header = labeled.shape[1] - grid.shape[1]
    assert header > 8 and torch.equal(labeled[:, header:], grid)  # a header strip over the same picture
    assert (labeled[:, :header] < 0.5).any()  # with text in it


def test_visible_positions_hold_the_true_pixels_and_one_column_borrows_nothing_hidden():
    model = fcmae.create_model("atto", img_size=64, **SMALL).eval()
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    hidden = torch.nn.functional.interpolate(mask.view(2, 1, 2, 2), scale_factor=32)  # 1 where removed
    changed = imgs + hidden * torch.randn_like(imgs) * 3  # other pixels under the removed patches only
    grid_a = reconstruction_grid(model, imgs, mask, labels=False)
    grid_b = reconstruction_grid(model, changed, mask, labels=False)
    cell = lambda g, r, c: g[:, 2 + r * 66 : 66 + r * 66, 2 + c * 66 : 66 + c * 66]  # noqa: E731
    for r in range(2):
        visible = (1 - hidden[r, 0]).bool()
        assert torch.allclose(cell(grid_a, r, 3)[:, visible], cell(grid_a, r, 0)[:, visible])  # true pixels pasted
        assert not torch.allclose(cell(grid_a, r, 2), cell(grid_b, r, 2))  # the true patch mean/std leak in
        assert torch.allclose(cell(grid_a, r, 4), cell(grid_b, r, 4), atol=1e-5)  # prediction alone: no leak


def test_images_are_sampled_at_random_with_the_seed():
    assert sample_indices(3, 10, seed=0) == sample_indices(3, 10, seed=0)
    draws = {tuple(sample_indices(3, 10, seed=s)) for s in range(5)}
    assert len(draws) > 1  # other seeds, other images; not always the first files
    assert sample_indices(8, 3, seed=0) == [0, 1, 2]  # fewer images than asked: all of them


def test_cli_writes_a_png_from_a_model_file(tmp_path, capsys):
    model = fcmae.create_model("atto", img_size=64, **SMALL)
    fcmae.save_model(model, tmp_path / "model.safetensors")
    write_photos(tmp_path / "images", 3, size=80)
    (tmp_path / "images" / "broken.png").write_bytes(b"junk")
    out = tmp_path / "grid.png"
    assert main(["--checkpoint", str(tmp_path / "model.safetensors"), "--images", str(tmp_path / "images"),
                 "--out", str(out), "--num-images", "4"]) == 0
    height, width, _ = np.asarray(Image.open(out)).shape
    assert height > 2 + 3 * 66 and width == 2 + 5 * 66  # a labeled header over 3 rows of 5 columns
    assert f"warning: skipped unreadable image {tmp_path / 'images' / 'broken.png'}: " in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "MISSING"], "no such checkpoint"),
    (["--images", "NOWHERE"], "data path not found"),
    (["--input-size", "70"], "not a multiple of the patch size 32"),
    (["--input-size", "0"], "not a multiple of the patch size 32"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--out", "OUTDIR"], "--out must name a .png file"),
    (["--num-images", "x"], "argument --num-images: invalid int value: 'x'"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    fcmae.save_model(fcmae.create_model("atto", img_size=64, **SMALL), tmp_path / "m.safetensors")
    write_photos(tmp_path / "images", 1, size=80)
    base = {"--checkpoint": str(tmp_path / "m.safetensors"), "--images": str(tmp_path / "images")}
    subst = {"MISSING": str(tmp_path / "x.safetensors"), "NOWHERE": str(tmp_path / "nowhere"), "OUTDIR": str(tmp_path)}
    given = dict(zip(args[::2], [subst.get(a, a) for a in args[1::2]]))
    argv = [x for k, v in {**base, "--out": str(tmp_path / "g.png"), **given}.items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_training_checkpoint_folder_loads_with_its_run_config(tmp_path):
    """Accelerate's model.safetensors in a checkpoint folder is bare weights; config.yaml beside it says the rest."""
    model = fcmae.create_model("atto", img_size=(64, 96), mask_ratio=0.5, decoder_depth=1, decoder_embed_dim=32,
                               norm_pix_loss=False)
    folder = tmp_path / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "trainer_state.json").write_text('{"step": 2}')
    (folder / "config.yaml").write_text("model: convnextv2_atto\ninput_size: [64, 96]\nmask_ratio: 0.5\n"
                                        "decoder_depth: 1\ndecoder_embed_dim: 32\nnorm_pix_loss: false\n")
    loaded = fcmae.load_model(folder)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert fcmae.load_model(folder, mask_ratio=0.75).mask_ratio == 0.75


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_preview_of_other_channel_counts(channels):
    """One or two channels: the first as gray; more than three: the first three as RGB; stretched to [0, 1]."""
    from fcmae.visualize import _preview

    imgs = torch.randn(2, channels, 8, 8)
    out = _preview(imgs)
    assert out.shape == (2, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    first = imgs[:, :3] if channels > 3 else imgs[:, :1].expand(-1, 3, -1, -1)
    low, high = first.amin(dim=(1, 2, 3), keepdim=True), first.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, (first - low) / (high - low))


def photo_batch(tmp_path, size: int = 128) -> torch.Tensor:
    """Two real photos, normalized: a colour one (astronaut) and a grayscale one (camera), both lossless PNG."""
    from fcmae.data import eval_transform, load_rgb

    files = write_photos(tmp_path, 3, size=size)  # 0: astronaut.png, 2: camera.png (stored as RGB, R = G = B)
    transform = eval_transform((size, size), crop_pct=1.0)
    return torch.stack([transform(load_rgb(files[0])), transform(load_rgb(files[2]))])


def cells(grid: torch.Tensor, rows: int, size: int) -> torch.Tensor:
    """(rows, columns, 3, size, size): the images of an unlabeled grid."""
    step = size + 2
    return torch.stack([torch.stack([grid[:, 2 + r * step: 2 + r * step + size, 2 + c * step: 2 + c * step + size]
                                     for c in range(5)]) for r in range(rows)])


def test_the_reconstruction_columns_gray_out_the_visible_positions(tmp_path):
    """Issue 24 item 11: the loss ignores the prediction at the visible positions, so it is untrained noise
    there; columns 3 and 5 show those positions gray (whatever the model puts there), and the labels say so."""
    from fcmae.visualize import COLUMNS

    model = randomize_(fcmae.create_model("atto", img_size=128, **SMALL)).eval()
    imgs = photo_batch(tmp_path)
    mask = model.random_masking(2, (4, 4), generator=torch.Generator().manual_seed(1))
    shown = cells(reconstruction_grid(model, imgs, mask, labels=False), 2, 128)
    hidden = torch.nn.functional.interpolate(mask.view(2, 1, 4, 4), scale_factor=32).bool()[:, 0]
    for r in range(2):
        for column in (2, 4):
            assert torch.all(shown[r, column][:, ~hidden[r]] == 0.5), (r, column)  # gray where visible
            assert shown[r, column][:, hidden[r]].std() > 0.05, (r, column)  # the prediction where hidden
        assert torch.equal(shown[r, 3][:, ~hidden[r]], shown[r, 0][:, ~hidden[r]])  # pasted: the true pixels
    assert "hidden" in COLUMNS[2] and "hidden" in COLUMNS[4]


def test_prediction_alone_keeps_gray_gray_and_colour_colour_image_by_image(tmp_path):
    """Issue 24 item 12: column 5 was stretched to the whole batch's visible range in the normalized space, which
    turned grayscale photos bright blue and colour ones into saturated tiles. A perfect norm-pix prediction now
    shows each hidden patch's true pattern around its mean colour, one scale for all channels of an image: a
    grayscale photo stays exactly gray, a colour photo keeps its colours, and no image depends on the others."""
    model = Oracle(fcmae.FCMAEConfig("custom", **SMALL, img_size=128))
    imgs = photo_batch(tmp_path)
    mask = model.random_masking(2, (4, 4), generator=torch.Generator().manual_seed(1))
    shown = cells(reconstruction_grid(model, imgs, mask, labels=False), 2, 128)
    hidden = torch.nn.functional.interpolate(mask.view(2, 1, 4, 4), scale_factor=32).bool()[:, 0]
    alone = shown[:, 4]  # (2, 3, H, W)
    original = shown[:, 0]
    patch_mean = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(original, 32), scale_factor=32)
    for r in range(2):
        assert ((alone[r][:, hidden[r]] % 1) == 0).float().mean() < 0.02  # not saturated (0 or 1)
        for patch in mask[r].nonzero()[:, 0].tolist():
            rows, cols = slice(patch // 4 * 32, patch // 4 * 32 + 32), slice(patch % 4 * 32, patch % 4 * 32 + 32)
            shift = alone[r][:, rows, cols].flatten(1) - 0.5
            deviation = (original[r] - patch_mean[r])[:, rows, cols].flatten(1)  # around the patch's mean colour
            unclamped = (shift.abs() < 0.5).all(dim=0)
            shift, deviation = shift[:, unclamped], deviation[:, unclamped]
            scale = (shift * deviation).sum() / deviation.square().sum()  # one scale for all three channels
            assert scale > 0 and (shift - scale * deviation).abs().max() < 5e-5 * scale, (r, patch)  # float error
    colour, gray = alone[0][:, hidden[0]], alone[1][:, hidden[1]]
    assert (gray.amax(0) - gray.amin(0)).max() < 1e-5 and gray.std() > 0.05  # gray, with the photo's pattern
    assert (colour.amax(0) - colour.amin(0)).mean() > 0.03  # the astronaut keeps colour
    single = [cells(reconstruction_grid(model, imgs[r:r + 1], mask[r:r + 1], labels=False), 1, 128)[0, 4]
              for r in range(2)]
    assert all(torch.allclose(single[r], alone[r], atol=1e-6) for r in range(2))  # per image, not per batch


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_grids_of_other_channel_counts(channels):
    model = fcmae.create_model("atto", img_size=64, in_chans=channels, **SMALL).eval()
    imgs = torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    grid = reconstruction_grid(model, imgs, mask, labels=False)
    assert grid.shape == (3, 2 + 2 * 66, 2 + 5 * 66) and grid.min() >= 0 and grid.max() <= 1
    alone = grid[:, 2:66, 2 + 4 * 66: 66 + 4 * 66]  # row 0: patches 0 and 3 removed
    assert torch.all(alone[:, :32, 32:] == 0.5) and alone[:, :32, :32].std() > 0.05
