"""The decoder on the removed patches only (a training step) against the dense decoder of the official code."""

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fcmae
from fcmae.decoder import split_patches
from helpers import SMALL, randomize_, rel_err

GRID = (3, 4)  # 96 x 128 px: a non-square grid
IMGS = torch.randn(3, 3, 32 * GRID[0], 32 * GRID[1], generator=torch.Generator().manual_seed(0))
MASKS = {
    "uniform": fcmae.random_mask(3, GRID, 0.6, generator=torch.Generator().manual_seed(1)),
    # ragged: one sample keeps 1 patch, one keeps 6, one removes none (it adds nothing to the loss)
    "ragged": torch.tensor([[1.0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1],
                            [0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1],
                            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]),
}


def model_for(depth: int, backend: str = "sparse", norm_pix: bool = True) -> fcmae.FCMAE:
    return randomize_(fcmae.create_model("atto", img_size=GRID[0] * 32, decoder_depth=depth, backend=backend,
                                         norm_pix_loss=norm_pix, **SMALL))


def reference_step(model: fcmae.FCMAE, imgs: torch.Tensor, mask: torch.Tensor):
    """The step as it was before the decoder skipped kept patches: every patch decoded, the loss on removed ones."""
    grid = model.encoder.check_input(imgs)
    latent = model.encoder.encode(imgs, mask, grid, fcmae.sparse.kept_count(mask))
    pred = model.decoder(latent, mask).flatten(2).transpose(1, 2)  # FCMAEDecoder.forward: the official decoder
    return model.forward_loss(imgs, pred, mask), pred


def loss_pred_grads(model: fcmae.FCMAE, run):
    model.zero_grad(set_to_none=True)
    loss, pred = run()
    loss.backward()
    return loss.detach(), pred.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_step(ours, reference, mask: torch.Tensor, tol: float = 1e-5):
    """Same loss, same predictions at removed patches and exact zeros at kept ones, the same gradient everywhere."""
    (loss, pred, grads), (ref_loss, ref_pred, ref_grads) = ours, reference
    removed = mask.bool()
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(pred[removed], ref_pred[removed]) <= tol
    assert torch.equal(pred[~removed], torch.zeros_like(pred[~removed]))  # kept patches: not computed
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        # a parameter the loss does not reach (depth 0: proj) gets a zero gradient, as before, not None
        assert grads[name] is not None and rel_err(grads[name], ref_grad) <= tol, name


# Every depth with both encoder backends; norm_pix_loss on and off at each depth (the loss is the same function in
# both steps, so every combination of the three adds nothing but time).
CASES = [(0, "sparse", True), (0, "dense", False), (1, "sparse", True), (1, "sparse", False), (1, "dense", True),
         (2, "sparse", False), (2, "dense", True)]


@pytest.mark.parametrize("depth, backend, norm_pix", CASES)
def test_training_step_decodes_removed_patches_only_and_equals_the_dense_decoder(depth, backend, norm_pix):
    model = model_for(depth, backend, norm_pix)
    for mask in MASKS.values():
        reference = loss_pred_grads(model, lambda: reference_step(model, IMGS, mask))
        assert_same_step(loss_pred_grads(model, lambda: model(IMGS, mask)[:2]), reference, mask)
    torch.manual_seed(2)
    _, _, drawn = model(IMGS)  # a mask drawn by forward: its kept count comes from the mask ratio, not the mask
    torch.manual_seed(2)
    ours = loss_pred_grads(model, lambda: model(IMGS)[:2])
    assert_same_step(ours, loss_pred_grads(model, lambda: reference_step(model, IMGS, drawn)), drawn)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_bf16_autocast_step_equals_the_dense_decoders(backend):
    """Under bf16 autocast the removed rows get the very ops they got before (the loss and predictions come out
    equal here); gradients sum over fewer rows in bf16 matmuls, within a bf16 step or two (2**-8 = 0.4%)."""
    model = model_for(1, backend)
    for mask in MASKS.values():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, grads = loss_pred_grads(model, lambda: model(IMGS, mask)[:2])
            ref_loss, ref_pred, ref_grads = loss_pred_grads(model, lambda: reference_step(model, IMGS, mask))
        removed = mask.bool()
        assert pred.dtype == torch.bfloat16 and torch.equal(pred[~removed], torch.zeros_like(pred[~removed]))
        assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(pred[removed].float(), ref_pred[removed].float()) <= 1e-2
        for name, ref_grad in ref_grads.items():
            assert rel_err(grads[name], ref_grad) <= 1e-2, name


def test_eval_mode_predicts_every_patch():
    """Reconstruction grids run the model in eval mode: kept patches are predicted there, as the dense decoder does."""
    model = model_for(1).eval()
    mask = MASKS["uniform"]
    with torch.no_grad():
        loss, pred, _ = model(IMGS, mask)
        ref_loss, ref_pred = reference_step(model, IMGS, mask)
    assert torch.equal(pred, ref_pred) and torch.equal(loss, ref_loss)
    assert (pred[~mask.bool()] != 0).all()


def test_known_count_and_nonzero_give_the_same_predictions():
    model = model_for(2)
    mask = MASKS["uniform"]
    latent = torch.randn(3, SMALL["dims"][-1], *GRID)
    kept = int((mask[0] == 0).sum())
    with torch.no_grad():
        by_count = model.decoder.forward_removed(latent, mask, count=kept)
        by_nonzero = model.decoder.forward_removed(latent, mask)
        dense = model.decoder(latent, mask).flatten(2).transpose(1, 2)
    assert torch.equal(by_count, by_nonzero)
    assert rel_err(by_count[mask.bool()], dense[mask.bool()]) <= 1e-6
    for count in (kept, None):
        kept_index, removed_index = split_patches(mask, count)
        assert torch.equal(kept_index, (mask.flatten() == 0).nonzero().squeeze(1))
        assert torch.equal(removed_index, mask.flatten().nonzero().squeeze(1))


@pytest.mark.parametrize("depth", [1, 2])
def test_removed_only_decoder_compiles_whole(depth):
    """torch.compile(fullgraph=True) takes the decoder when the count is known: no nonzero, no host read."""
    torch._dynamo.reset()
    model = model_for(depth)
    mask = MASKS["uniform"]
    latent = torch.randn(3, SMALL["dims"][-1], *GRID)
    count = int((mask[0] == 0).sum())
    compiled = torch.compile(model.decoder.forward_removed, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (3, 4):  # another mask with the same count: the same graph
            assert rel_err(compiled(latent, mask, count), model.decoder.forward_removed(latent, mask, count)) <= 1e-6
            mask = fcmae.random_mask(3, GRID, 0.6, generator=torch.Generator().manual_seed(seed))


def test_a_ragged_mask_runs_the_dense_backends_decoder_eager():
    """The decoder reads a ragged mask with nonzero(), which no full graph takes: eager, with one warning."""
    torch._dynamo.reset()
    eager = model_for(1, backend="dense")
    compiled = model_for(1, backend="dense").compile_step(backend="aot_eager")
    mask = MASKS["ragged"]
    with pytest.warns(UserWarning, match="different numbers of patches runs the decoder in eager mode"):
        ours = loss_pred_grads(compiled, lambda: compiled(IMGS, mask)[:2])
    assert_same_step(ours, loss_pred_grads(eager, lambda: reference_step(eager, IMGS, mask)), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # uniform masks run the graph, without a warning
        ours = loss_pred_grads(compiled, lambda: compiled(IMGS, MASKS["uniform"])[:2])
    assert_same_step(ours, loss_pred_grads(eager, lambda: reference_step(eager, IMGS, MASKS["uniform"])),
                     MASKS["uniform"])


def decoder_flops(model: fcmae.FCMAE, mask: torch.Tensor) -> int:
    """FLOPs of one forward of the decoder as `forward` runs it in this mode."""
    latent = torch.randn(mask.shape[0], SMALL["dims"][-1], *GRID)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_decoder(latent, mask, int((mask[0] == 0).sum()), every_patch=not model.training)
    return counter.get_total_flops()


def test_training_skips_the_kept_patches_matmuls():
    """proj on kept patches only; the last block's fc2 and pred on removed ones only; the rest dense."""
    model = model_for(2)
    mask = MASKS["uniform"]
    n, num_patches = mask.shape
    removed = int(mask.sum())
    kept = n * num_patches - removed
    width, enc = SMALL["decoder_embed_dim"], SMALL["dims"][-1]
    out = 32 * 32 * 3
    dwconv = 2 * n * num_patches * width * 49

    def matmul(rows, k, m):
        return 2 * rows * k * m

    dense_block = dwconv + matmul(n * num_patches, width, 4 * width) + matmul(n * num_patches, 4 * width, width)
    last_block = dwconv + matmul(n * num_patches, width, 4 * width) + matmul(removed, 4 * width, width)
    assert decoder_flops(model.eval(), mask) == (matmul(n * num_patches, enc, width) + 2 * dense_block
                                                 + matmul(n * num_patches, width, out))
    assert decoder_flops(model.train(), mask) == (matmul(kept, enc, width) + dense_block + last_block
                                                  + matmul(removed, width, out))


def test_checkpoint_keys_are_the_official_decoders():
    """The decoder's state dict keeps the names exports and conversion read (timm blocks, proj, mask_token, pred)."""
    keys = [k for k in model_for(1).state_dict() if k.startswith("decoder.")]
    block = ["conv_dw.weight", "conv_dw.bias", "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.grn.weight", "mlp.grn.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert sorted(keys) == sorted(["decoder.proj.weight", "decoder.proj.bias", "decoder.mask_token",
                                   "decoder.pred.weight", "decoder.pred.bias"] + [f"decoder.blocks.0.{k}" for k in block])
