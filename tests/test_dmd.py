"""DMD backbone (docs/design.md § DMD) on tiny models: shapes per dataset and layout, the distillation graphs, the
margin and orthogonality losses against hand-worked values, the weighted auxiliary loss, training
signal of every term, the fixed-length contract (module and command line), the official weights
(fixture dmd_mosei_official.pt and a round trip on other configurations) and the validation loss."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.causal import CausalHead, CausalMER, causal_loss
from src.errors import CheckpointError, ConfigError
from src.models import build_backbone
from src.models.dmd import (DMD, EDGES, ORDER, GraphDistillation, distillation_losses, load_official_state_dict,
                            margin_loss, orthogonality_loss)
from src.models.engine import ENGINES
from src.models.standalone import BackboneOnly
from src.losses import task_loss

REPO = Path(__file__).resolve().parents[1]
D_MODEL, HEADS = 8, 2

# Real feature sizes (text, audio, vision) and sequence lengths (aligned, unaligned), the DMD config's
# kernels and the task layout per dataset.
DATASETS = {
    "iemocap": {"dims": (300, 74, 35), "aligned": (20, 20, 20), "unaligned": (20, 400, 500),
                "kernels": (3, 5, 3), "task": "binary"},
    "mosei_senti": {"dims": (300, 74, 35), "aligned": (50, 50, 50), "unaligned": (50, 500, 500),
                    "kernels": (5, 1, 3), "task": "cls"},
    "mosi": {"dims": (300, 5, 20), "aligned": (50, 50, 50), "unaligned": (50, 375, 500),
             "kernels": (5, 5, 5), "task": "regression"},
}
OUTPUTS = {"binary": 8, "cls": 7, "regression": 1}
TERMS = ("task", "homo_logit", "homo_reg", "homo_repr", "hetero_logit", "hetero_repr", "hetero_reg",
         "recon", "cycle", "margin", "orthogonality")


@pytest.fixture(params=ENGINES)
def engine(request):
    """The model tests run once per engine."""
    return request.param


def tiny_dmd(dims=(6, 5, 4), seq_lens=(7, 9, 8), kernels=(3, 1, 2), output_dim=3, dropout=0.0, **overrides):
    settings = dict(orig_dims=dims, seq_lens=seq_lens, output_dim=output_dim, kernel_sizes=kernels,
                    d_model=D_MODEL, num_heads=HEADS, layers=1, attn_dropout=dropout, attn_dropout_a=dropout,
                    attn_dropout_v=dropout, relu_dropout=dropout, res_dropout=dropout, embed_dropout=dropout,
                    out_dropout=dropout, text_dropout=dropout, gd_size_homo=6, gd_size_hetero=5)
    settings.update(overrides)
    return DMD(**settings)


def random_inputs(dims, lengths, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, dim, generator=generator) for length, dim in zip(lengths, dims)]


def random_target(task, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if task == "binary":
        return torch.randint(0, 2, (batch, 4), generator=generator)
    if task == "cls":
        return torch.randint(0, 7, (batch,), generator=generator)
    return torch.rand(batch, generator=generator) * 6 - 3


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
def test_shapes_and_a_training_step_for_every_dataset_and_layout(dataset, layout, engine):
    spec = DATASETS[dataset]
    lengths, task = spec[layout], spec["task"]
    torch.manual_seed(0)
    model = build_backbone("dmd", orig_dims=spec["dims"], seq_lens=lengths, output_dim=OUTPUTS[task],
                           kernel_sizes=spec["kernels"], d_model=D_MODEL, num_heads=HEADS, layers=1, engine=engine)
    text, audio, vision = random_inputs(spec["dims"], lengths, batch=2)
    logits, extras = model(text, audio, vision)
    classes = OUTPUTS[task]
    assert logits.shape == (2, classes)

    conv = [lengths[0] - spec["kernels"][0] + 1, lengths[2] - spec["kernels"][2] + 1,
            lengths[1] - spec["kernels"][1] + 1]  # DMD's order: text, vision, audio
    for key in ("features", "specific", "common", "recon", "specific_cycle"):
        assert [tuple(x.shape) for x in extras[key]] == [(2, D_MODEL, t) for t in conv], key
    assert [x.shape for x in extras["logits_homo"]] == [(2, classes)] * 3
    assert [x.shape for x in extras["logits_hetero"]] == [(2, classes)] * 3
    assert [x.shape for x in extras["repr_homo"]] == [(2, D_MODEL)] * 3
    assert [x.shape for x in extras["c_sim"]] == [(2, D_MODEL)] * 3
    assert [x.shape for x in extras["repr_hetero"]] == [(2, 2 * D_MODEL)] * 3
    assert extras["logits_c"].shape == (2, classes)

    target = random_target(task, 2)
    loss = task_loss(logits, target) + model.aux_loss(extras, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.proj_l.weight.grad.abs().sum() > 0


def test_regression_target_of_shape_b1_and_backbone_only_adds_the_aux_loss(engine):
    torch.manual_seed(0)
    model = tiny_dmd(engine=engine, output_dim=1).eval()
    inputs = random_inputs((6, 5, 4), (7, 9, 8))
    target = torch.tensor([0.5, -1.0, 0.5])
    wrapped = BackboneOnly(model).eval()
    with torch.no_grad():
        out = wrapped(*inputs)
        logits, extras = model(*inputs)
        expected = task_loss(logits, target) + model.aux_loss(extras, target)
        assert torch.allclose(wrapped.loss(out, target), expected)
        assert torch.allclose(model.aux_loss(extras, target.view(3, 1)), model.aux_loss(extras, target))


@pytest.mark.parametrize("seq_lens,kernels", [((8, 8, 8), (1, 1, 1)), ((7, 30, 24), (3, 1, 2))])
def test_fast_and_plain_engines_agree_in_values_and_gradients(seq_lens, kernels):
    """Aligned lengths (encoders batched by the fast engine) and unaligned ones (each alone)."""
    results = []
    for engine in ("plain", "fast"):
        torch.manual_seed(0)
        model = tiny_dmd(seq_lens=seq_lens, kernels=kernels, engine=engine).train()  # every dropout 0
        inputs = random_inputs((6, 5, 4), seq_lens)
        target = torch.tensor([0, 1, 2])
        logits, extras = model(*inputs)
        (task_loss(logits, target) + model.aux_loss(extras, target)).backward()
        with torch.no_grad():
            eval_logits, eval_extras = model.eval()(*inputs)
        results.append((logits, eval_logits, eval_extras["logits_c"], {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.allclose(a, b, atol=1e-5)
    for name, grad in results[0][3].items():
        if grad is not None:
            assert torch.allclose(grad, results[1][3][name], atol=1e-4), name


def test_common_encoders_are_plain_modules_under_their_saved_names():
    model = tiny_dmd()
    assert {m: len(model.common_encoders[m].layers) for m in "lva"} == {"l": 1, "v": 1, "a": 1}
    assert "common_encoders.v.layers.0.self_attn.in_proj_weight" in model.state_dict()
    assert "trans_a_with_v.layer_norm.weight" in model.state_dict()


# ------------------------------------------------------------------------------ graph distillation
def test_edge_weights_of_each_graph_sum_to_one_per_sample(engine):
    torch.manual_seed(0)
    model = tiny_dmd(engine=engine).eval()
    with torch.no_grad():
        _, extras = model(*random_inputs((6, 5, 4), (7, 9, 8), batch=5))
        for graph, logits, reprs in ((model.homo_graph, extras["logits_homo"], extras["repr_homo"]),
                                     (model.hetero_graph, extras["logits_hetero"], extras["repr_hetero"])):
            edges = graph.edges(logits, reprs)
            assert edges.shape == (5, 6)
            assert (edges > 0).all()
            assert torch.allclose(edges.sum(dim=1), torch.ones(5))


def test_priors_favour_text_as_teacher_and_vision_to_audio_in_the_heterogeneous_graph():
    homo = GraphDistillation(3, 4, 2, (0, 0, 1, 0, 1, 0), "l1").prior
    hetero = GraphDistillation(3, 4, 2, (0, 0, 1, 0, 1, 1), "cosine").prior
    assert torch.allclose(homo.sum(), torch.tensor(1.0)) and torch.allclose(hetero.sum(), torch.tensor(1.0))
    # EDGES order is l<-v, l<-a, v<-l, v<-a, a<-l, a<-v (student <- teacher), indices into (l, v, a).
    assert EDGES[2] == (1, 0) and EDGES[4] == (2, 0) and EDGES[5] == (2, 1)
    big, small = math.exp(4) / (2 * math.exp(4) + 4), 1 / (2 * math.exp(4) + 4)
    assert torch.allclose(homo, torch.tensor([small, small, big, small, big, small]))
    assert hetero.argsort(descending=True)[:3].sort().values.tolist() == [2, 4, 5]


@pytest.mark.parametrize("repr_distance", ["l1", "cosine"])
def test_teachers_get_no_gradient_from_the_distillation_losses(repr_distance):
    """Text (index 0) is only a teacher here: its student edges (l<-v, l<-a) get weight zero."""
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 3, generator=generator, requires_grad=True) for _ in range(3)]
    # positive vectors: every cosine is positive, so max(0, cos) passes gradient
    reprs = [torch.rand(4, 5, generator=generator).add(0.1).requires_grad_() for _ in range(3)]
    prior = torch.softmax(torch.tensor([0.0, 0, 1, 0, 1, 0]) / 0.25, dim=0)
    edges = torch.rand(4, 6, generator=generator)
    edges[:, :2] = -prior[:2]  # edge + prior = 0 where text is the student
    losses = distillation_losses(logits, reprs, edges, prior, repr_distance)
    (losses["logit"] + losses["repr"]).backward()
    assert logits[0].grad.abs().max() == 0 and reprs[0].grad.abs().max() == 0
    for student in (1, 2):
        assert logits[student].grad.abs().sum() > 0 and reprs[student].grad.abs().sum() > 0


def test_distillation_losses_by_hand():
    """One sample, C = 1: logit loss = Σ_edges (e + p)·|o_j − o_i|; reg = 10·Σ (e − p)²."""
    logits = [torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([[0.0]])]
    reprs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
    edges = torch.full((1, 6), 1 / 6)
    prior = torch.tensor([0.1, 0.1, 0.3, 0.1, 0.3, 0.1])
    gaps = [abs(logits[s].item() - logits[t].item()) for s, t in EDGES]  # 2, 1, 2, 3, 1, 3
    expected_logit = sum((1 / 6 + p) * g for p, g in zip(prior.tolist(), gaps))
    expected_reg = 10 * sum((1 / 6 - p) ** 2 for p in prior.tolist())
    l1 = distillation_losses(logits, reprs, edges, prior, "l1")
    assert l1["logit"].item() == pytest.approx(expected_logit, rel=1e-6)
    assert l1["reg"].item() == pytest.approx(expected_reg, rel=1e-6)
    # representation L1 gaps: l-v 1, l-a 2, v-a 1 (both directions), weight 10
    repr_gaps = [1, 2, 1, 1, 2, 1]
    assert l1["repr"].item() == pytest.approx(10 * sum((1 / 6 + p) * g for p, g in zip(prior.tolist(), repr_gaps)))
    # cosines: l-v 1/√2, l-a 0, v-a 1/√2
    cosines = [2 ** -0.5, 0.0, 2 ** -0.5, 2 ** -0.5, 0.0, 2 ** -0.5]
    cosine = distillation_losses(logits, reprs, edges, prior, "cosine")
    assert cosine["repr"].item() == pytest.approx(10 * sum((1 / 6 + p) * c for p, c in zip(prior.tolist(), cosines)))


def test_heterogeneous_representation_loss_multiplies_the_batch_means():
    """Two samples, prior 0: 10 · Σ_edges mean_b(max(0, cos)) · mean_b(e), the reference's reduction.

    cosines per sample: l-v (1, 0), l-a (0, 0), v-a (0, 1), the same both ways; edge weights sample 0
    (.5, .1, .1, .1, .1, .1), sample 1 (.1, .1, .1, .5, .1, .1). Edges l<-v .5 · .3, v<-l .5 · .1,
    v<-a .5 · .3, a<-v .5 · .1, the rest 0: 10 · 0.4 = 4 (a per-sample product would give 6).
    """
    reprs = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
             torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    logits = [torch.zeros(2, 1)] * 3
    edges = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.5, 0.1, 0.1]])
    losses = distillation_losses(logits, reprs, edges, torch.zeros(6), "cosine")
    assert losses["repr"].item() == pytest.approx(4.0, abs=1e-6)


def test_homogeneous_representations_are_post_relu_and_the_graph_reads_them():
    torch.manual_seed(0)
    model = tiny_dmd().eval()
    with torch.no_grad():
        _, extras = model(*random_inputs((6, 5, 4), (7, 9, 8), batch=5))
        for m, common, representation in zip(ORDER, extras["common"], extras["repr_homo"]):
            before = model.homo_heads[m].proj1(common.reshape(5, -1))
            assert (before < 0).any()  # the ReLU has something to do
            assert torch.equal(representation, torch.relu(before))
        expected = model.homo_graph(extras["logits_homo"], [torch.relu(r) for r in extras["repr_homo"]])
        terms = model.aux_terms(extras, torch.tensor([0, 1, 2, 0, 1]))
        assert torch.allclose(terms["homo_repr"], expected["repr"]) and torch.allclose(terms["homo_reg"], expected["reg"])


# ------------------------------------------------------------------------- margin and orthogonality
def test_margin_loss_hand_worked_example():
    """Vectors (1,0), (0,1), (1,0), (-1,0) with labels 0, 0, 1, 2; margin 0.15·|y_a − y_n|.

    anchor 0: positive 1 (cos 0); negatives 2 (cos 1, |Δy| 1) and 3 (cos −1, |Δy| 2):
              max(0, 0.15 − 0 + 1) = 1.15 and max(0, 0.30 − 0 − 1) = 0  -> mean 0.575
    anchor 1: positive 0 (cos 0); negatives 2 (cos 0) and 3 (cos 0): 0.15 and 0.30 -> mean 0.225
    anchors 2 and 3 have no positive and are left out: loss = (0.575 + 0.225) / 2 = 0.4.
    """
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    assert margin_loss(features, torch.tensor([0, 0, 1, 2])).item() == pytest.approx(0.4, abs=1e-6)
    # the same with float scores (regression), and with vectors of any length (cosine only)
    assert margin_loss(3 * features, torch.tensor([0.0, 0.0, 1.0, 2.0])).item() == pytest.approx(0.4, abs=1e-6)


def test_margin_loss_on_emotion_bits_counts_differing_emotions():
    """(1,0) and (0,1) share the bits 1000; (0,1) is labelled 0110, three emotions away: margin 0.45.

    anchor 0: positive 1 (cos 0), negative 2 (cos 0): 0.45;  anchor 1: positive 0 (cos 0), negative 2
    (cos 1): 1.45;  anchor 2 has no positive. Loss = (0.45 + 1.45) / 2 = 0.95.
    """
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bits = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    assert margin_loss(features, bits).item() == pytest.approx(0.95, abs=1e-6)


def test_margin_loss_is_zero_without_anchors_that_have_both_kinds_and_chunks_agree():
    assert margin_loss(torch.randn(6, 3), torch.zeros(6)).item() == 0.0
    import src.models.dmd as dmd

    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(30, 4, generator=generator), torch.randint(0, 3, (30,), generator=generator)
    whole = margin_loss(features, labels)
    saved = dmd._MARGIN_BLOCK_ELEMENTS
    try:
        dmd._MARGIN_BLOCK_ELEMENTS = 30 * 30 * 4  # four anchors per chunk
        assert torch.allclose(margin_loss(features, labels), whole)
    finally:
        dmd._MARGIN_BLOCK_ELEMENTS = saved


@pytest.mark.parametrize("axis", ["batch", "feature"])
def test_orthogonality_loss_is_zero_for_orthogonal_features_and_one_for_equal_ones(axis):
    generator = torch.Generator().manual_seed(0)
    specific = torch.randn(3, 8, 5, generator=generator)
    assert orthogonality_loss(specific, specific, axis).item() == pytest.approx(1.0, abs=1e-6)
    assert orthogonality_loss(specific, -specific, axis).item() == 0.0  # opposite directions are not penalised
    # Orthogonal along the axis the cosine runs on: disjoint supports there.
    common = torch.randn(3, 8, 5, generator=generator)
    if axis == "feature":
        specific, common = specific.clone(), common.clone()
        specific[:, 4:], common[:, :4] = 0, 0
    else:
        specific, common = specific.clone(), common.clone()
        specific[1:], common[:1] = 0, 0
    assert orthogonality_loss(specific, common, axis).item() == 0.0


def test_orthogonality_loss_by_hand_along_the_batch_and_the_feature_axis():
    """B = 2, d = 2, T = 1: s = ((1, 0), (1, 1)), c = ((1, 1), (-1, 1)) per sample (feature vectors).

    batch axis, feature 0: s = (1, 1), c = (1, -1): cos 0; feature 1: s = (0, 1), c = (1, 1): cos 1/√2
      -> mean over the two features of max(0, cos) = 1/(2√2)
    feature axis, sample 0: s = (1, 0), c = (1, 1): cos 1/√2; sample 1: s = (1, 1), c = (-1, 1): cos 0
      -> mean over the two samples = 1/(2√2) as well; a third sample separates the two:
    sample 2: s = (1, 0), c = (1, 0) adds 1 to the feature mean (-> (1/√2 + 1)/3) and changes the
      batch cosines to feature 0: s = (1, 1, 1), c = (1, -1, 1): 1/3; feature 1: s = (0, 1, 0),
      c = (1, 1, 0): 1/√2  -> (1/3 + 1/√2)/2.
    """
    specific = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]).unsqueeze(2)  # (B, d, T)
    common = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 0.0]]).unsqueeze(2)
    root = 2 ** -0.5
    assert orthogonality_loss(specific[:2], common[:2], "batch").item() == pytest.approx(root / 2, abs=1e-6)
    assert orthogonality_loss(specific[:2], common[:2], "feature").item() == pytest.approx(root / 2, abs=1e-6)
    assert orthogonality_loss(specific, common, "batch").item() == pytest.approx((1 / 3 + root) / 2, abs=1e-6)
    assert orthogonality_loss(specific, common, "feature").item() == pytest.approx((root + 1) / 3, abs=1e-6)
    assert orthogonality_loss(specific, common).item() == pytest.approx((1 / 3 + root) / 2, abs=1e-6)  # default


def test_orthogonality_axis_is_a_constructor_key_and_a_bad_value_is_refused():
    torch.manual_seed(0)
    batch, feature = tiny_dmd().eval(), tiny_dmd(orthogonality_axis="feature").eval()
    feature.load_state_dict(batch.state_dict())
    target = torch.tensor([0, 1, 2])
    with torch.no_grad():
        _, extras = batch(*random_inputs((6, 5, 4), (7, 9, 8)))
        expected = {axis: sum(orthogonality_loss(s, c, axis) for s, c in zip(extras["specific"], extras["common"]))
                    for axis in ("batch", "feature")}
        assert torch.allclose(batch.aux_terms(extras, target)["orthogonality"], expected["batch"])
        assert torch.allclose(feature.aux_terms(extras, target)["orthogonality"], expected["feature"])
        assert not torch.allclose(expected["batch"], expected["feature"])
    with pytest.raises(ConfigError, match="orthogonality_axis"):
        tiny_dmd(orthogonality_axis="time")


# ---------------------------------------------------------------------------------- auxiliary loss
def test_aux_loss_is_the_weighted_sum_of_spec_terms(engine):
    torch.manual_seed(0)
    model = tiny_dmd(engine=engine).eval()
    target = torch.tensor([0, 1, 2])
    with torch.no_grad():
        _, extras = model(*random_inputs((6, 5, 4), (7, 9, 8)))
        terms = model.aux_terms(extras, target)
        expected = (terms["task"] + 0.05 * (terms["homo_logit"] + terms["homo_reg"])
                    + 0.05 * (terms["hetero_logit"] + terms["hetero_repr"] + terms["hetero_reg"])
                    + 0.1 * (terms["cycle"] + terms["recon"] + 0.1 * (terms["margin"] + terms["orthogonality"])))
        assert torch.allclose(model.aux_loss(extras, target), expected)
        branch_logits = [*extras["logits_homo"], *extras["logits_hetero"], extras["logits_c"]]
        assert torch.allclose(terms["task"], sum(task_loss(x, target) for x in branch_logits))
    assert set(terms) == set(TERMS)


@pytest.mark.parametrize("term", TERMS)
def test_each_aux_term_is_finite_and_decreases_when_optimised(term, engine):
    torch.manual_seed(0)
    model = tiny_dmd(engine=engine)
    inputs = random_inputs((6, 5, 4), (7, 9, 8), batch=6)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        _, extras = model(*inputs)
        value = model.aux_terms(extras, target)[term]
        assert torch.isfinite(value)
        values.append(value.item())
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    assert values[0] > 0
    assert values[-1] < values[0], values


# ------------------------------------------------------------------------------------ fixed lengths
def test_data_of_another_length_is_refused_naming_both_lengths(engine):
    model = tiny_dmd(engine=engine, seq_lens=(7, 9, 8))
    text, audio, vision = random_inputs((6, 5, 4), (7, 9, 8))
    model(text, audio, vision)  # the built lengths work
    with pytest.raises(ConfigError) as err:
        model(*random_inputs((6, 5, 4), (7, 20, 8)))
    message = str(err.value)
    assert "audio" in message and "9 steps" in message and "20" in message


def test_kernel_longer_than_the_sequence_is_refused():
    with pytest.raises(ConfigError) as err:
        tiny_dmd(seq_lens=(7, 9, 8), kernels=(8, 1, 1))
    assert "text" in str(err.value) and "8" in str(err.value) and "7 steps" in str(err.value)
    with pytest.raises(ConfigError, match="seq_lens"):
        tiny_dmd(seq_lens=None)
    with pytest.raises(ConfigError, match="divisible"):
        tiny_dmd(num_heads=3)


def test_bad_kernel_through_main_is_a_clean_user_error(synthetic_data, tmp_path):
    data_dir = synthetic_data(dataset="mosei_senti")  # aligned: 50 steps per modality
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "main.py", "train", "--dataset", "mosei_senti", "--model", "dmd", "--data-dir", str(data_dir),
         "--runs-dir", str(tmp_path), "--device", "cpu", "--epochs", "1", "--name", "bad",
         # corrected accumulation: the tiny epoch would otherwise be refused first, for never stepping
         "--set", "model.backbone_params.kernel_sizes=[60, 1, 3]", "--set", "train.accumulation=corrected"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "text" in result.stderr and "60" in result.stderr and "50 steps" in result.stderr


# --------------------------------------------------------------------------------- official weights
# The official argument names of the fixture's config -> the keys of configs/backbones/dmd.yaml.
OFFICIAL_MODEL_ARGS = {"nlevels": "layers", "attn_dropout": "attn_dropout", "attn_dropout_a": "attn_dropout_a",
                       "attn_dropout_v": "attn_dropout_v", "relu_dropout": "relu_dropout",
                       "embed_dropout": "embed_dropout", "res_dropout": "res_dropout", "output_dropout": "out_dropout",
                       "text_dropout": "text_dropout", "attn_mask": "attn_mask"}
OFFICIAL_TRAIN_ARGS = {"update_epochs": "accumulate", "grad_clip": "grad_clip_value", "early_stop": "early_stop"}
OFFICIAL_OUTPUTS = {"logits_{m}_homo": "logits_homo", "repr_{m}_homo": "repr_homo", "c_{m}_sim": "c_sim",
                    "logits_{m}_hetero": "logits_hetero", "repr_{m}_hetero": "repr_hetero", "origin_{m}": "features",
                    "recon_{m}": "recon", "s_{m}_r": "specific_cycle"}
OFFICIAL_SEQUENCE_OUTPUTS = {"s_{m}": "specific", "c_{m}": "common"}  # (T, B, d) there, (B, d, T) here


def dmd_yaml(dataset):
    import yaml

    return yaml.safe_load((REPO / "configs" / "backbones" / "dmd.yaml").read_text())[dataset]


def test_the_fixture_config_is_the_mosei_block_of_the_dmd_yaml(fixtures_dir):
    config = torch.load(fixtures_dir / "dmd_mosei_official.pt", weights_only=True)["config"]
    block = dmd_yaml("mosei_senti")
    model, train = block["model"], block["train"]
    for official, ours in OFFICIAL_MODEL_ARGS.items():
        assert model[ours] == config[official], ours
    assert [model["d_model"], model["num_heads"]] == config["dst_feature_dim_nheads"]
    assert model["kernel_sizes"] == [config[f"conv1d_kernel_size_{m}"] for m in ("l", "a", "v")]
    for official, ours in OFFICIAL_TRAIN_ARGS.items():
        assert train[ours] == config[official], ours
    assert train["lr"]["backbone"] == config["learning_rate"]
    assert train["plateau"]["patience"] == config["patience"]
    assert train["accumulation"] == "reference" and config["KeyEval"] == "Loss"


def test_official_weights_give_the_official_outputs_loss_and_gradients(fixtures_dir):
    fixture = torch.load(fixtures_dir / "dmd_mosei_official.pt", weights_only=True)
    model = DMD(orig_dims=fixture["config"]["feature_dims"], seq_lens=fixture["seq_lens"], output_dim=1,
                **dmd_yaml("mosei_senti")["model"])
    load_official_state_dict(model, fixture["state_dict"], fixture["homo_gd_state_dict"], fixture["hetero_gd_state_dict"])
    model.eval()
    inputs = {name: tensor.clone().requires_grad_() for name, tensor in fixture["inputs"].items()}
    logits, extras = model(inputs["text"], inputs["audio"], inputs["vision"])
    official = fixture["outputs"]
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, official["output_logit"], **close)
    torch.testing.assert_close(extras["logits_c"], official["logits_c"], **close)
    for index, m in enumerate(ORDER):
        for name, ours in OFFICIAL_OUTPUTS.items():
            torch.testing.assert_close(extras[ours][index], official[name.format(m=m)], **close, msg=name.format(m=m))
        for name, ours in OFFICIAL_SEQUENCE_OUTPUTS.items():
            torch.testing.assert_close(extras[ours][index].permute(2, 0, 1), official[name.format(m=m)], **close)

    labels, losses = fixture["labels"], fixture["losses"]
    terms = model.aux_terms(extras, labels)
    names = {"task": "task_branches", **{key: key for key in TERMS if key != "task"}}
    for ours, theirs in names.items():
        # homo_repr is in no total; 1e-5 relative to its size, since it sums L1 distances
        torch.testing.assert_close(terms[ours], losses[theirs], atol=1e-5, rtol=1e-6 if ours == "homo_repr" else 0)
    total = task_loss(logits, labels) + model.aux_loss(extras, labels)
    torch.testing.assert_close(task_loss(logits, labels), losses["task_all"], **close)
    torch.testing.assert_close(total, losses["combined"], **close)
    total.backward()
    for name in ("text", "audio", "vision"):
        torch.testing.assert_close(inputs[name].grad, fixture["grads"][name], **close, msg=name)


def official_state_dicts(model: DMD):
    """Our DMD's weights under the official names and layout (the inverse of load_official_state_dict,
    written out separately), plus the official extras the loader must skip."""
    d_model = model.encoder_c.weight.shape[0]
    model_state, homo, hetero = {}, {}, {}

    def time_major(tensor, axis, length):
        """Our flattened axis k·T + t -> the official t·d + k."""
        moved = tensor.movedim(axis, 0)
        moved = moved.reshape(d_model, length, *moved.shape[1:]).transpose(0, 1).reshape(moved.shape)
        return moved.movedim(0, axis)

    heads = {"common_head": "{layer}_c", "fusion_head": "{layer}"}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("homo_graph", "hetero_graph"):
            target = homo if parts[0] == "homo_graph" else hetero
            official = {"logit_proj": "W_logit", "repr_proj": "W_repr", "edge_score": "W_edge"}[parts[1]]
            target[f"{official}.{parts[2]}"] = tensor
            continue
        if parts[0] in ("encoder_s", "decoder", "gates"):
            name = {"encoder_s": "encoder_s_{m}", "decoder": "decoder_{m}", "gates": "weight_{m}"}[parts[0]]
            name = name.format(m=parts[1]) + "." + parts[2]
        elif parts[0] == "homo_heads":
            m, layer, kind = parts[1], parts[2], parts[3]
            if layer == "align":
                name = f"align_c_{m}.{kind}"
            else:
                name = f"{layer}_{m}_low.{kind}"
                axis = 0 if layer == "proj2" else (1 if kind == "weight" else None)
                if axis is not None:
                    tensor = time_major(tensor, axis, model.conv_lens[m])
        elif parts[0] == "hetero_heads":
            name = f"{parts[2]}_{parts[1]}_high.{parts[3]}"
        elif parts[0] in heads:
            name = heads[parts[0]].format(layer=parts[1]) + "." + parts[2]
        elif parts[0] == "gate_c":
            name = f"weight_c.{parts[1]}"
        elif parts[0] == "common_encoders":
            name = f"self_attentions_c_{parts[1]}." + ".".join(parts[2:])
        else:  # proj_l/a/v, encoder_c, trans_*
            name = key
        model_state[name] = tensor
    for m in ORDER:
        flat = d_model * model.conv_lens[m]
        model_state[f"proj_cosine_{m}.weight"], model_state[f"proj_cosine_{m}.bias"] = torch.zeros(d_model, flat), torch.zeros(d_model)
        model_state[f"self_attentions_c_{m}.version"] = torch.tensor([2.0])
    model_state["trans_l_mem.embed_positions._float_tensor"] = torch.zeros(1)
    return model_state, homo, hetero


OTHER_CONFIGS = [
    dict(dims=(6, 5, 4), seq_lens=(7, 9, 8), kernels=(3, 1, 2), output_dim=3, d_model=8, num_heads=2, layers=1),
    dict(dims=(5, 3, 4), seq_lens=(11, 6, 9), kernels=(1, 3, 5), output_dim=1, d_model=12, num_heads=3, layers=2),
]


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_the_official_layout_computes_our_homogeneous_head_on_other_configurations(config):
    """The inverse mapping above is the official layout: the official homogeneous head, written out
    on c_m flattened time-major, gives our logits and representation with those weights."""
    torch.manual_seed(0)
    settings = dict(config)
    model = tiny_dmd(dims=settings.pop("dims"), seq_lens=settings.pop("seq_lens"), kernels=settings.pop("kernels"),
                     **settings).eval()
    official, _, _ = official_state_dicts(model)
    with torch.no_grad():
        _, extras = model(*random_inputs(config["dims"], config["seq_lens"], batch=4))
        for index, m in enumerate(ORDER):
            common = extras["common"][index]  # (B, d, T)
            flat = common.permute(0, 2, 1).reshape(4, -1)  # official: time-major

            def linear(name, x):
                return x @ official[f"{name}.weight"].t() + official[f"{name}.bias"]

            representation = torch.relu(linear(f"proj1_{m}_low", flat))
            logits = linear(f"out_layer_{m}_low", linear(f"proj2_{m}_low", representation) + flat)
            torch.testing.assert_close(representation, extras["repr_homo"][index], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, extras["logits_homo"][index], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(linear(f"align_c_{m}", common.reshape(4, -1)), extras["c_sim"][index],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_official_names_round_trip_into_a_fresh_model_on_other_configurations(config):
    settings = dict(config)
    build = dict(dims=settings.pop("dims"), seq_lens=settings.pop("seq_lens"), kernels=settings.pop("kernels"), **settings)
    torch.manual_seed(1)
    source = tiny_dmd(**build).eval()
    torch.manual_seed(2)
    loaded = tiny_dmd(**build).eval()
    load_official_state_dict(loaded, *official_state_dicts(source))
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    inputs = random_inputs(config["dims"], config["seq_lens"], batch=4)
    target = torch.tensor([0, 1, 2, 0]) if config["output_dim"] == 3 else torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        (a, extras_a), (b, extras_b) = source(*inputs), loaded(*inputs)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(source.aux_loss(extras_a, target), loaded.aux_loss(extras_b, target))


def test_official_weights_that_do_not_fit_are_refused_naming_the_keys():
    torch.manual_seed(0)
    model = tiny_dmd()
    state, homo, hetero = official_state_dicts(model)
    missing = {k: v for k, v in state.items() if k != "proj1_v_low.bias"}
    with pytest.raises(CheckpointError, match=r"missing.*homo_heads\.v\.proj1\.bias"):
        load_official_state_dict(tiny_dmd(), missing, homo, hetero)
    with pytest.raises(CheckpointError, match=r"unexpected.*hetero_gd_state_dict\['W_extra\.weight'\]"):
        load_official_state_dict(tiny_dmd(), state, homo, {**hetero, "W_extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected.*state_dict\['proj3\.weight'\]"):
        load_official_state_dict(tiny_dmd(), {**state, "proj3.weight": torch.zeros(1)}, homo, hetero)
    # built for other lengths: the homogeneous heads do not fit, and the error says which and why
    with pytest.raises(CheckpointError, match=r"sequence lengths.*proj1_l_low\.weight'\] -> homo_heads\.l\.proj1\.weight"):
        load_official_state_dict(tiny_dmd(seq_lens=(8, 9, 8)), state, homo, hetero)


# --------------------------------------------------------------------------------- validation loss
def test_dmd_is_validated_on_its_fused_task_loss_alone():
    torch.manual_seed(0)
    backbone = tiny_dmd()
    inputs, target = random_inputs((6, 5, 4), (7, 9, 8)), torch.tensor([0, 1, 2])
    alone = BackboneOnly(backbone).eval()
    with torch.no_grad():
        out = alone(*inputs)
        torch.testing.assert_close(alone.validation_loss(out, target), task_loss(out["logits_m"], target))
        aux = backbone.aux_loss(out["extras"], target)
        assert aux > 0  # ... while it trains with the auxiliary loss
        torch.testing.assert_close(alone.loss(out, target), task_loss(out["logits_m"], target) + aux)

        branches = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(length * dim, 3))
                    for length, dim in zip((7, 9, 8), (6, 5, 4))]
        wrapped = CausalMER(backbone, *branches, CausalHead()).eval()
        out = wrapped(*inputs)
        torch.testing.assert_close(wrapped.validation_loss(out, target), causal_loss(out, target))
        assert wrapped.loss(out, target) > wrapped.validation_loss(out, target)


def test_the_evaluated_loss_that_selects_dmd_checkpoints_is_its_task_loss():
    from src.run.distributed import Context
    from src.eval.evaluate import evaluate

    class Split:
        task = "cls"

        def __init__(self, tensors, target):
            self.tensors, self.target = tensors, target

        def __len__(self):
            return len(self.target)

        def get_batch(self, indices):
            index = torch.as_tensor(indices)
            return {**{name: t[index] for name, t in zip(("text", "audio", "vision"), self.tensors)},
                    "target": self.target[index]}

    torch.manual_seed(0)
    model = BackboneOnly(tiny_dmd(output_dim=7))
    inputs, target = random_inputs((6, 5, 4), (7, 9, 8), batch=6), torch.tensor([0, 1, 2, 3, 4, 5])
    result = evaluate(model, Split(inputs, target), batch_size=6, ctx=Context(torch.device("cpu")))
    with torch.no_grad():
        logits, _ = model.backbone(*inputs)
    assert result["loss"] == pytest.approx(task_loss(logits, target).item(), rel=1e-5)
