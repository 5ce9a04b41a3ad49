"""Crossmodal attention maps: the weights read out of MulT and DMD, their aggregation and the writers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.analysis.attention import (CROSSMODAL_NAMES, aggregate, attention_maps, crossmodal_attention,
                                    has_crossmodal_attention, write_attention_npz)
from src.analysis.plots import plot_attention_grid
from src.errors import UserError
from src.models.encoder import embed_input, future_mask
from src.models.mult import MulT
from src.models.standalone import BackboneOnly
from tests.test_dmd import tiny_dmd
from tests.test_pmr import tiny_pmr

DIMS, LENGTHS, BATCH = (6, 5, 4), (7, 9, 8), 3
# target <- source of each encoder, as (query length, key length) indices into LENGTHS
PAIRS = {name: ("lav".index(name[6]), "lav".index(name[-1])) for name in CROSSMODAL_NAMES}


def inputs(seed=0, lengths=LENGTHS):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, length, dim, generator=generator) for length, dim in zip(lengths, DIMS)]


def tiny_mult(layers=2, attn_mask=True):
    torch.manual_seed(0)
    return MulT(DIMS, kernel_sizes=(1, 1, 1), d_model=10, layers=layers, attn_mask=attn_mask, output_dim=8)


def check_weights(weights, lengths, heads, masked=True):
    assert list(weights) == list(CROSSMODAL_NAMES)
    for name, w in weights.items():
        t_q, t_k = lengths[PAIRS[name][0]], lengths[PAIRS[name][1]]
        assert w.shape == (BATCH, heads, t_q, t_k), name
        torch.testing.assert_close(w.sum(-1), torch.ones(BATCH, heads, t_q))
        if masked:
            blocked = torch.isinf(future_mask(t_q, t_k, w.device))
            assert blocked.any() and (w[..., blocked] == 0).all(), name
            assert (w[..., ~blocked] > 0).all(), name


def test_mult_weights_have_the_shape_row_sums_and_masked_zeros():
    model = BackboneOnly(tiny_mult())
    model.train()
    weights = crossmodal_attention(model, *inputs())
    check_weights(weights, LENGTHS, heads=10)
    assert model.training  # the model's mode is restored


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("engine", ["plain", "fast"])
def test_weights_reproduce_the_encoder_output(layers, engine):
    """The weights are the ones the encoder uses: recomputing its last layer from them gives its output."""
    mult = MulT(DIMS, kernel_sizes=(1, 1, 1), d_model=10, layers=layers, output_dim=8, engine="plain").eval()
    seen = {}
    handles = [getattr(mult, name).register_forward_hook(
        lambda module, args, output, name=name: seen.update({name: (args, output)})) for name in CROSSMODAL_NAMES]
    with torch.no_grad():
        mult(*inputs(1))
    for handle in handles:
        handle.remove()
    mult.engine = engine  # the read-out runs the plain modules whatever engine the model trains with
    weights = crossmodal_attention(mult, *inputs(1))
    assert mult.engine == engine
    for name in CROSSMODAL_NAMES:
        encoder = getattr(mult, name)
        (x_in, x_in_k, *_), output = seen[name]
        x, x_k = embed_input(x_in, 0.0, False), embed_input(x_in_k, 0.0, False)
        with torch.no_grad():
            for earlier in encoder.layers[:-1]:
                x = earlier(x, x_k, x_k, mask=future_mask(x.shape[0], x_k.shape[0], x.device))
        layer, attention = encoder.layers[-1], encoder.layers[-1].self_attn
        e = attention.embed_dim
        value = F.linear(layer.layer_norms[0](x_k), attention.in_proj_weight[2 * e:], attention.in_proj_bias[2 * e:])
        heads = value.view(value.shape[0], BATCH, attention.num_heads, -1).permute(1, 2, 0, 3)
        attended = (weights[name] @ heads).permute(2, 0, 1, 3).reshape(x.shape[0], BATCH, e)
        x = x + attention.out_proj(attended)
        x = x + layer.fc2(F.relu(layer.fc1(layer.layer_norms[1](x))))
        with torch.no_grad():
            torch.testing.assert_close(encoder.layer_norm(x), output, atol=1e-5, rtol=1e-5)


def test_without_the_future_mask_nothing_is_masked():
    weights = crossmodal_attention(tiny_mult(attn_mask=False), *inputs())
    check_weights(weights, LENGTHS, heads=10, masked=False)
    assert all((w > 0).all() for w in weights.values())


def test_dmd_heterogeneous_branch_and_pmr():
    torch.manual_seed(0)
    dmd = tiny_dmd(dims=DIMS, seq_lens=LENGTHS, kernels=(1, 1, 1), output_dim=8)
    check_weights(crossmodal_attention(dmd, *inputs()), LENGTHS, heads=2)
    pmr = tiny_pmr(dims=DIMS, kernels=(1, 1, 1), output_dim=8)
    assert not has_crossmodal_attention(pmr)
    with pytest.raises(UserError, match="no MulT crossmodal encoders"):
        crossmodal_attention(pmr, *inputs())


def test_aggregate_averages_heads_and_samples_or_picks_one():
    weights = torch.zeros(2, 2, 1, 3)
    weights[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    weights[0, 1, 0] = torch.tensor([0.0, 1.0, 0.0])
    weights[1, :, 0] = torch.tensor([0.0, 0.0, 1.0])
    np.testing.assert_allclose(aggregate(weights), [[0.25, 0.25, 0.5]])
    np.testing.assert_allclose(aggregate(weights, sample=0), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(aggregate(weights, sample=1), [[0.0, 0.0, 1.0]])


class Batches:
    """A dataset of fixed tensors with the project's get_batch interface."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def get_batch(self, indices):
        indices = torch.as_tensor(np.asarray(indices))
        return dict(zip(("text", "audio", "vision"), (t[indices] for t in self.tensors)))


def test_maps_are_the_mean_over_the_split_in_any_batch_size_or_one_sample():
    model = tiny_mult().eval()
    data = Batches(inputs(2))
    whole = {name: aggregate(w) for name, w in crossmodal_attention(model, *data.tensors).items()}
    for batch_size in (1, 2, 3):
        maps = attention_maps(model, data, batch_size, torch.device("cpu"))
        for name in CROSSMODAL_NAMES:
            np.testing.assert_allclose(maps[name], whole[name], atol=1e-6)
            np.testing.assert_allclose(maps[name].sum(-1), 1.0, atol=1e-6)
    single = attention_maps(model, data, 2, torch.device("cpu"), sample=1)
    alone = crossmodal_attention(model, *(t[1:2] for t in data.tensors))
    for name in CROSSMODAL_NAMES:
        np.testing.assert_allclose(single[name], aggregate(alone[name]), atol=1e-6)
    with pytest.raises(UserError, match="--sample 3"):
        attention_maps(model, data, 2, torch.device("cpu"), sample=3)


def test_npz_holds_one_array_per_encoder_and_the_grid_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    maps = {name: rng.dirichlet(np.ones(4), size=3) for name in CROSSMODAL_NAMES}
    path = write_attention_npz(maps, tmp_path / "attention.npz")
    with np.load(path) as saved:
        assert sorted(saved.files) == sorted(CROSSMODAL_NAMES)
        for name in CROSSMODAL_NAMES:
            np.testing.assert_array_equal(saved[name], maps[name])
    assert not list(tmp_path.glob("*.partial"))
    png = plot_attention_grid(maps, tmp_path / "attention.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_padded_steps_are_left_out_of_the_mean():
    """Sample 0 is left-padded; its padded query and key steps must not enter the mean, and a cell no
    sample fills is nan. Checked against the per-sample maps picked by hand."""
    from src.analysis.attention import SIDES, real_steps

    features = torch.ones(2, 5, 3)
    features[0, :2] = 0.0  # sample 0: input steps 0 and 1 are padding
    # Kernel 3 (5 input steps -> 3 encoder steps): step 0 sees inputs 0-2 (real, input 2), no step is padding;
    # kernel 2: step 0 sees inputs 0-1, all padding.
    assert real_steps(features, 3)[0].tolist() == [True, True, True]
    assert real_steps(features, 4)[0].tolist() == [False, True, True, True]
    assert real_steps(features, 5)[1].all()

    model = tiny_mult().eval()
    data = list(inputs(2))
    for tensor in data:
        tensor[0, :3] = 0.0  # sample 0 padded at its first 3 input steps in every modality
    data[0][:, 0] = 0.0  # every sample's first text step is padding: text-query row 0 is empty
    maps = attention_maps(model, Batches(data), 2, torch.device("cpu"))
    per_sample = crossmodal_attention(model, *data)
    by_name = dict(zip(("text", "audio", "vision"), data))
    for name in CROSSMODAL_NAMES:
        weights = per_sample[name].double().mean(dim=1)  # (B, T_q, T_k)
        query, key = SIDES[name]
        real_q = real_steps(by_name[query], weights.shape[1])
        real_k = real_steps(by_name[key], weights.shape[2])
        for i in range(weights.shape[1]):
            for j in range(weights.shape[2]):
                kept = [weights[b, i, j].item() for b in range(BATCH) if real_q[b, i] and real_k[b, j]]
                if kept:
                    assert maps[name][i, j] == pytest.approx(np.mean(kept), abs=1e-6)
                else:
                    assert np.isnan(maps[name][i, j])
    assert np.isnan(maps["trans_l_with_a"][0]).all() and np.isnan(maps["trans_a_with_l"][:, 0]).all()
    assert not np.isnan(maps["trans_a_with_v"]).any()


def test_each_attention_panel_has_its_own_colour_scale():
    from src.analysis.plots import colour_limits

    uniform = np.full((3, 4), 0.25)
    uniform[0, 0] = 0.26
    assert colour_limits(uniform) == (0.25, 0.26)  # not 0..1: the near-uniform panel keeps its contrast
    assert colour_limits(np.array([[np.nan, 0.1], [0.7, np.nan]])) == (0.1, 0.7)
    assert colour_limits(np.full((2, 2), np.nan)) == (0.0, 1.0)
