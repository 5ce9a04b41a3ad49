"""DMD backbone (SPEC §8) on tiny models: shapes per dataset and layout, the distillation graphs, the
margin and orthogonality losses against hand-worked values, the weighted auxiliary loss, training
signal of every term, and the fixed-length contract (module and command line)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.errors import ConfigError
from src.models import build_backbone
from src.models.engine import ENGINES
from src.models.dmd import (DMD, EDGES, GraphDistillation, distillation_losses, margin_loss,
                            orthogonality_loss)
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
                    d_model=D_MODEL, num_heads=HEADS, nlevels=1, attn_dropout=dropout, attn_dropout_a=dropout,
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
                           kernel_sizes=spec["kernels"], d_model=D_MODEL, num_heads=HEADS, nlevels=1, engine=engine)
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


def test_orthogonality_loss_is_zero_for_orthogonal_features_and_one_for_equal_ones():
    generator = torch.Generator().manual_seed(0)
    specific = torch.zeros(3, 8, 5)
    common = torch.zeros(3, 8, 5)
    specific[:, :4] = torch.randn(3, 4, 5, generator=generator)
    common[:, 4:] = torch.randn(3, 4, 5, generator=generator)
    assert orthogonality_loss(specific, common).item() == 0.0
    assert orthogonality_loss(specific, specific).item() == pytest.approx(1.0, abs=1e-6)
    assert orthogonality_loss(specific, -specific).item() == 0.0  # opposite directions are not penalised


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
         "--set", "model.backbone_params.kernel_sizes=[60, 1, 3]"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "text" in result.stderr and "60" in result.stderr and "50 steps" in result.stderr
