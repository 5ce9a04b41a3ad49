"""DMD, Decoupled Multimodal Distillation (Li et al., CVPR 2023), as docs/design.md § DMD fixes it.

Each modality's features are split into a modality-specific part s_m and a part c_m common to all
modalities (one encoder shared by the three). The common parts feed a "homogeneous" branch, the
specific parts MulT's crossmodal "heterogeneous" branch; each branch's per-modality predictions are
distilled into each other along a learned graph, and a gated fusion of both gives the logits.

text/audio/vision (B, L_m, d_m)                                   modality order inside: l, v, a
  -> text dropout; Conv1d per modality (kernel k_m, no bias)       X_m (B, d, T_m), T_m = L_m - k_m + 1
  -> s_m = E_m(X_m), c_m = E_c(X_m), r_m = D_m([s_m; c_m]), s'_m = E_m(r_m)      (1x1 convolutions)
  -> homogeneous, per m: flatten c_m -> head -> logits_homo_m, repr_homo_m (post-ReLU); c_sim_m
  -> common fusion: self-attention encoder per m over c_m, last steps -> c_f (B, 3d) -> logits_c
  -> heterogeneous: MulT's six crossmodal + three memory encoders over s_m -> h_m (B, 2d)
     -> residual head per m -> logits_hetero_m, repr_hetero_m
  -> fused: z = [σ(W h_l); σ(W h_v); σ(W h_a); σ(W c_f)] (B, 9d) -> residual head -> logits (B, C)

`forward` returns `(logits, extras)`; `aux_loss(extras, target)` is the auxiliary loss of docs/design.md § DMD
(the per-branch task losses, the two graph distillations, reconstruction, cycle, margin and orthogonality
terms). Only this module reads the extras.

Choices where the design (docs/design.md § DMD) is silent:
- the dropout inside every residual head (homogeneous, heterogeneous, common, fused) is
  `out_dropout`;
- the common self-attention encoder over c_m uses modality m's attention dropout, as MulT's
  per-modality encoders do (text `attn_dropout`, audio `attn_dropout_a`, vision `attn_dropout_v`);
  memory encoders use `attn_dropout` (docs/design.md § MulT);
- the graph distillation's edge scores read the logits and representations without detaching
  them: only the teacher's side of each distance is cut from the gradient (the reference's `.detach()`);
- margin loss on IEMOCAP: a sample's label is its vector of four emotion bits; "same label" means all
  four agree, and |y_a - y_n| is the number of emotions that differ (1 to 4), so the margin grows
  with how different the two labels are, as a score difference does for sentiment;
- the heterogeneous graph's representation loss is summed over the six edges like the logit loss.

The design follows the reference code's arithmetic, and so does this module: the homogeneous representation is
post-ReLU (the reference's in-place ReLU), the heterogeneous representation loss multiplies the batch means of
max(0, cos) and of the edge weights, and the orthogonality cosine runs along the batch axis
(`orthogonality_axis` "batch"; "feature" is the per-step cosine along the feature axis).
`load_official_state_dict` loads the reference's weights.

Tensors are channel-first (B, d, T) around the 1x1 convolutions and sequence-first (T, B, E) inside
the shared MulT encoders.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..losses import target_kind, task_loss
from .encoder import TransformerEncoder
from .engine import resolve_engine, run_encoders
from .heads import ResidualHead
from .projections import add_input_projections, project_inputs
from .mult import add_crossmodal_encoders, crossmodal_memories

# DMD's modality order for its branches, graphs and concatenations.
ORDER = ("l", "v", "a")
NAMES = {"l": "text", "a": "audio", "v": "vision"}

# The graphs' ordered (student, teacher) pairs, as indices into ORDER: l<-v, l<-a, v<-l, v<-a, a<-l, a<-v.
EDGES = ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))
# Prior scores per edge; softmax(score / 0.25) makes the marked edges dominate: text teaches vision
# and audio in both graphs, and in the heterogeneous one vision teaches audio as well.
HOMO_PRIOR_SCORES = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
HETERO_PRIOR_SCORES = (0.0, 0.0, 1.0, 0.0, 1.0, 1.0)
PRIOR_TEMPERATURE = 0.25
EDGE_SCALE = 1.0 / 8.0        # edge scores are scaled by this before the softmax
GRAPH_REG_WEIGHT = 10.0       # pulls the batch-mean edge weights towards the prior
REPR_DISTILL_WEIGHT = 10.0    # weight of a graph's representation loss


# --- graph distillation --------------------------------------------------------------------------

def distillation_losses(logits, reprs, edges, prior, repr_distance: str) -> dict:
    """The losses of one distillation graph (docs/design.md § DMD), given its edge weights.

    logits/reprs: three (B, C) / (B, H) tensors in ORDER; edges (B, 6) per-sample edge weights in
    EDGES order; prior (6,). Each edge pulls its student towards its teacher, weighted per sample by
    (edge + prior); the teacher is detached so that it is never pulled towards its student.
    `repr_distance` "l1" uses the L1 distance for representations, weighted per sample like the
    logits; "cosine" uses max(0, cosine) reduced as the reference's CosineEmbeddingLoss does: its batch
    mean times the batch mean of the edge weight. Returns reg, logit and repr (scalars).
    """
    weights = edges + prior
    logit_loss = edges.new_zeros(())
    repr_loss = edges.new_zeros(())
    for index, (student, teacher) in enumerate(EDGES):
        weight = weights[:, index]
        logit_gap = (logits[student] - logits[teacher].detach()).abs().sum(dim=1)
        logit_loss = logit_loss + (weight * logit_gap).mean()
        if repr_distance == "l1":
            repr_gap = (reprs[student] - reprs[teacher].detach()).abs().sum(dim=1)
            repr_loss = repr_loss + (weight * repr_gap).mean()
        else:
            cosine = F.cosine_similarity(reprs[student], reprs[teacher].detach(), dim=1).clamp(min=0.0)
            repr_loss = repr_loss + cosine.mean() * weight.mean()
    reg = GRAPH_REG_WEIGHT * (edges.mean(dim=0) - prior).pow(2).sum()
    return {"reg": reg, "logit": logit_loss, "repr": REPR_DISTILL_WEIGHT * repr_loss}


class GraphDistillation(nn.Module):
    """Learned distillation graph over three modality vertices (logits o_m, representations r_m).

    Vertex embedding z_m = [W_o o_m; W_r r_m] (gd_size each); the score of edge (student j, teacher i)
    is a Linear map of [z_j; z_i]; a sample's six scores are scaled by 1/8 and softmaxed, so its edge
    weights sum to 1.
    """

    def __init__(self, num_classes: int, hidden_size: int, gd_size: int, prior_scores, repr_distance: str):
        super().__init__()
        if repr_distance not in ("l1", "cosine"):
            raise ValueError(f"repr_distance must be 'l1' or 'cosine', got {repr_distance!r}")
        self.logit_proj = nn.Linear(num_classes, gd_size)
        self.repr_proj = nn.Linear(hidden_size, gd_size)
        self.edge_score = nn.Linear(4 * gd_size, 1)
        self.repr_distance = repr_distance
        prior = torch.softmax(torch.tensor(prior_scores) / PRIOR_TEMPERATURE, dim=0)
        # A constant of the method, not a weight: kept out of state_dicts.
        self.register_buffer("prior", prior, persistent=False)

    def edges(self, logits, reprs) -> torch.Tensor:
        """(B, 6) edge weights in EDGES order; each row sums to 1."""
        vertices = [torch.cat([self.logit_proj(o), self.repr_proj(r)], dim=1) for o, r in zip(logits, reprs)]
        pairs = torch.stack([torch.cat([vertices[s], vertices[t]], dim=1) for s, t in EDGES], dim=1)
        scores = self.edge_score(pairs).squeeze(-1)  # (B, 6)
        return torch.softmax(scores.float() * EDGE_SCALE, dim=1)

    def forward(self, logits, reprs) -> dict:
        """Edge weights and the graph's reg, logit and repr losses."""
        edges = self.edges(logits, reprs)
        losses = distillation_losses([o.float() for o in logits], [r.float() for r in reprs], edges,
                                     self.prior, self.repr_distance)
        return {"edges": edges, **losses}


# --- similarity losses ---------------------------------------------------------------------------

def label_distance(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) label distances: |y_a - y_b| for (N,) scores or classes; for (N, K) bit labels the
    number of positions where they differ (IEMOCAP's four emotions)."""
    if labels.dim() == 1:
        values = labels.float()
        return (values.unsqueeze(1) - values.unsqueeze(0)).abs()
    return (labels.unsqueeze(1) != labels.unsqueeze(0)).sum(dim=2).float()


# Anchors per chunk are chosen so one (anchors, N, N) hinge tensor stays near this many elements.
_MARGIN_BLOCK_ELEMENTS = 1 << 22


def margin_loss(features: torch.Tensor, labels: torch.Tensor, scale: float = 0.15) -> torch.Tensor:
    """DMD's margin loss (docs/design.md § DMD) over N vectors (N, F) with labels (N,) or (N, K).

    For anchor a, positive b (same label, b != a) and negative n (different label):
    max(0, scale·|y_a - y_n| - cos(a, b) + cos(a, n)), averaged over the anchor's (b, n) pairs, then
    over the anchors that have both; 0 when none has.
    """
    count = features.shape[0]
    unit = F.normalize(features.float(), dim=1, eps=1e-8)
    cosine = unit @ unit.t()
    distance = label_distance(labels).to(cosine.device)
    not_self = ~torch.eye(count, dtype=torch.bool, device=cosine.device)
    positive = (distance == 0) & not_self
    negative = distance > 0
    pairs = positive.sum(dim=1) * negative.sum(dim=1)  # (b, n) pairs per anchor
    total = cosine.new_zeros(())
    chunk = max(1, _MARGIN_BLOCK_ELEMENTS // max(1, count * count))
    for start in range(0, count, chunk):
        rows = slice(start, start + chunk)
        hinge = F.relu(scale * distance[rows].unsqueeze(1) - cosine[rows].unsqueeze(2) + cosine[rows].unsqueeze(1))
        mask = positive[rows].unsqueeze(2) & negative[rows].unsqueeze(1)  # (anchors, b, n)
        per_anchor = (hinge * mask).sum(dim=(1, 2)) / pairs[rows].clamp(min=1)
        total = total + per_anchor.sum()
    return total / (pairs > 0).sum().clamp(min=1)


ORTHOGONALITY_AXES = ("batch", "feature")


def orthogonality_loss(specific: torch.Tensor, common: torch.Tensor, axis: str = "batch") -> torch.Tensor:
    """Mean of max(0, cos(s, c)) over the entries the cosine leaves; (B, d, T) inputs.

    "batch" (the reference, docs/design.md § DMD): the reference's CosineEmbeddingLoss on (T, B, d) tensors as the
    PyTorch it targets computed it, the cosine along the batch axis, one per (time step, feature),
    with 1e-12 added to each squared norm. "feature": one cosine per (sample, time step) along the
    feature axis, the orthogonality of each step's two vectors.
    """
    specific, common = specific.float(), common.float()
    if axis == "feature":
        return F.cosine_similarity(specific, common, dim=1).clamp(min=0.0).mean()
    dot = (specific * common).sum(dim=0)
    norms = ((specific * specific).sum(dim=0) + 1e-12) * ((common * common).sum(dim=0) + 1e-12)
    return (dot / norms.sqrt()).clamp(min=0.0).mean()


# --- building blocks -----------------------------------------------------------------------------

class HomogeneousHead(nn.Module):
    """One modality's homogeneous branch over its flattened common features (B, d·T).

    repr = relu(Linear(d·T -> d)(flat)); logits = out(Linear(d -> d·T)(dropout(repr)) + flat);
    sim = Linear(d·T -> d)(flat), the vector the margin loss compares across samples. The flattened
    axis is feature-major (index k·T + t).
    """

    def __init__(self, d_model: int, length: int, output_dim: int, out_dropout: float):
        super().__init__()
        flat = d_model * length
        self.proj1 = nn.Linear(flat, d_model)
        self.proj2 = nn.Linear(d_model, flat)
        self.out_layer = nn.Linear(flat, output_dim)
        self.align = nn.Linear(flat, d_model)
        self.out_dropout = out_dropout

    def forward(self, common: torch.Tensor):
        flat = common.reshape(common.shape[0], -1)
        # Post-ReLU, as the reference's in-place ReLU leaves it: its graph reads this representation.
        representation = F.relu(self.proj1(flat))
        hidden = self.proj2(F.dropout(representation, p=self.out_dropout, training=self.training)) + flat
        return self.out_layer(hidden), representation, self.align(flat)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv1d:
    return nn.Conv1d(in_channels, out_channels, kernel_size=1, padding=0, bias=False)


class DMD(nn.Module):
    """`forward(text, audio, vision)` -> `(logits (B, output_dim), extras)`; see the module docstring.

    orig_dims, seq_lens and kernel_sizes are in (text, audio, vision) order. The sequence lengths are
    fixed at construction: the homogeneous branch flattens each modality's whole sequence, so data
    of another length is refused with a ConfigError. The loss weights default to the reference's
    (docs/design.md § DMD).
    `orthogonality_axis` is "batch" (the reference) or "feature" (see `orthogonality_loss`). `engine`
    ("auto", "plain" or "fast", src/models/engine.py) chooses how the encoders are computed, as in MulT;
    the result and the parameters are the same whichever runs.

    The validation loss is the fused output's task loss alone, as the reference selects on it: the
    auxiliary terms train DMD but do not judge it (`validation_uses_aux_loss`, src/models/contract.py).
    """

    validation_uses_aux_loss = False

    def __init__(self, orig_dims, seq_lens, output_dim=1, kernel_sizes=(5, 1, 3), d_model=30, num_heads=6,
                 layers=4, attn_dropout=0.4, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.0,
                 res_dropout=0.0, embed_dropout=0.0, out_dropout=0.5, text_dropout=0.3, attn_mask=True,
                 gd_size_homo=64, gd_size_hetero=32, homo_distill_weight=0.05, hetero_distill_weight=0.05,
                 decouple_weight=0.1, similarity_weight=0.1, margin=0.15, orthogonality_axis="batch",
                 engine="auto"):
        super().__init__()
        if seq_lens is None:
            raise ConfigError("the dmd backbone needs the sequence lengths (seq_lens): its homogeneous branch "
                              "flattens whole sequences, so their lengths are part of the model")
        if layers < 1:
            raise ConfigError(f"dmd: layers must be at least 1, got {layers}")
        if orthogonality_axis not in ORTHOGONALITY_AXES:
            raise ConfigError(f"dmd: orthogonality_axis must be one of {', '.join(ORTHOGONALITY_AXES)}, "
                              f"got {orthogonality_axis!r}")
        if d_model % num_heads != 0:
            raise ConfigError(f"dmd: d_model {d_model} must be divisible by num_heads {num_heads}")
        kernels = dict(zip(("l", "a", "v"), kernel_sizes))
        self.seq_lens = dict(zip(("l", "a", "v"), (int(length) for length in seq_lens)))
        self.conv_lens = {}
        for m in ORDER:
            self.conv_lens[m] = self.seq_lens[m] - kernels[m] + 1
            if self.conv_lens[m] < 1:
                raise ConfigError(f"dmd: the {NAMES[m]} kernel size {kernels[m]} is longer than the {NAMES[m]} "
                                  f"sequences of the data ({self.seq_lens[m]} steps); choose a kernel of at most "
                                  f"{self.seq_lens[m]} (model.backbone_params.kernel_sizes)")
        self.text_dropout = text_dropout
        self.homo_distill_weight = homo_distill_weight
        self.hetero_distill_weight = hetero_distill_weight
        self.decouple_weight = decouple_weight
        self.similarity_weight = similarity_weight
        self.margin = margin
        self.orthogonality_axis = orthogonality_axis
        resolve_engine(engine, "cpu")  # refuses an unknown name now rather than at the first forward
        self.engine = engine

        add_input_projections(self, orig_dims, d_model, kernel_sizes)

        # Decoupling: a specific encoder and a decoder per modality, one common encoder for all.
        self.encoder_s = nn.ModuleDict({m: _conv1x1(d_model, d_model) for m in ORDER})
        self.encoder_c = _conv1x1(d_model, d_model)
        self.decoder = nn.ModuleDict({m: _conv1x1(2 * d_model, d_model) for m in ORDER})

        self.homo_heads = nn.ModuleDict({m: HomogeneousHead(d_model, self.conv_lens[m], output_dim, out_dropout)
                                         for m in ORDER})

        shared = dict(relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout,
                      attn_mask=attn_mask)
        own_attn_dropout = {"l": attn_dropout, "a": attn_dropout_a, "v": attn_dropout_v}
        # One self-attention encoder per modality, saved as `common_encoders.<m>.layers...`.
        self.common_encoders = nn.ModuleDict({
            m: TransformerEncoder(d_model, num_heads, layers, attn_dropout=own_attn_dropout[m], **shared)
            for m in ORDER})
        self.common_head = ResidualHead(3 * d_model, output_dim, out_dropout)

        # Heterogeneous branch: MulT's structure (and names); crossmodal attention dropout follows the source.
        add_crossmodal_encoders(self, d_model, num_heads, layers, attn_dropout, attn_dropout_a, attn_dropout_v,
                                **shared)
        self.hetero_heads = nn.ModuleDict({m: ResidualHead(2 * d_model, output_dim, out_dropout) for m in ORDER})

        self.gates = nn.ModuleDict({m: nn.Linear(2 * d_model, 2 * d_model) for m in ORDER})
        self.gate_c = nn.Linear(3 * d_model, 3 * d_model)
        self.fusion_head = ResidualHead(9 * d_model, output_dim, out_dropout)

        self.homo_graph = GraphDistillation(output_dim, d_model, gd_size_homo, HOMO_PRIOR_SCORES, "l1")
        self.hetero_graph = GraphDistillation(output_dim, 2 * d_model, gd_size_hetero, HETERO_PRIOR_SCORES, "cosine")

    def _check_lengths(self, text, audio, vision) -> None:
        for m, x in (("l", text), ("a", audio), ("v", vision)):
            if x.shape[1] != self.seq_lens[m]:
                raise ConfigError(
                    f"this dmd model was built for {NAMES[m]} sequences of {self.seq_lens[m]} steps but the data "
                    f"has {x.shape[1]}: its homogeneous branch flattens whole sequences, so the lengths are fixed "
                    f"when it is built; use data with the same layout (aligned or unaligned) as the model, or "
                    f"build a new model for these lengths")

    def forward(self, text, audio, vision):
        """text/audio/vision (B, L_m, d_m) -> (logits (B, output_dim), extras for aux_loss)."""
        self._check_lengths(text, audio, vision)
        text = F.dropout(text, p=self.text_dropout, training=self.training)
        features = dict(zip(("l", "a", "v"), project_inputs(self, text, audio, vision)))  # X_m, (B, d, T_m)
        specific = {m: self.encoder_s[m](features[m]) for m in ORDER}
        common = {m: self.encoder_c(features[m]) for m in ORDER}
        recon = {m: self.decoder[m](torch.cat([specific[m], common[m]], dim=1)) for m in ORDER}
        specific_cycle = {m: self.encoder_s[m](recon[m]) for m in ORDER}

        homo = {m: self.homo_heads[m](common[m]) for m in ORDER}  # (logits, repr, sim)

        # Common fusion: self-attention over each c_m, last time step, concatenated l, v, a.
        common_seq = [common[m].permute(2, 0, 1) for m in ORDER]
        engine = resolve_engine(self.engine, self.proj_l.weight.device)
        attended = run_encoders([self.common_encoders[m] for m in ORDER], common_seq, last_step=True, engine=engine)
        common_fused = torch.cat(attended, dim=1)  # c_f (B, 3d)
        logits_c, _ = self.common_head(common_fused)

        # Heterogeneous branch over the specific features, as MulT does over its projections.
        x_l, x_a, x_v = (specific[m].permute(2, 0, 1) for m in ("l", "a", "v"))
        memories = crossmodal_memories(self, x_l, x_a, x_v, engine)
        last = dict(zip(("l", "a", "v"), memories))  # h_m (B, 2d)
        hetero = {m: self.hetero_heads[m](last[m]) for m in ORDER}  # (logits, repr)

        gated = [torch.sigmoid(self.gates[m](last[m])) for m in ORDER]
        gated.append(torch.sigmoid(self.gate_c(common_fused)))
        logits, _ = self.fusion_head(torch.cat(gated, dim=1))  # z (B, 9d)

        extras = {
            "logits_homo": [homo[m][0] for m in ORDER],
            "repr_homo": [homo[m][1] for m in ORDER],
            "c_sim": [homo[m][2] for m in ORDER],
            "logits_hetero": [hetero[m][0] for m in ORDER],
            "repr_hetero": [hetero[m][1] for m in ORDER],
            "logits_c": logits_c,
            "features": [features[m] for m in ORDER],
            "specific": [specific[m] for m in ORDER],
            "common": [common[m] for m in ORDER],
            "recon": [recon[m] for m in ORDER],
            "specific_cycle": [specific_cycle[m] for m in ORDER],
        }
        return logits, extras

    def aux_terms(self, extras: dict, target: torch.Tensor) -> dict:
        """Every unweighted term of the auxiliary loss, by name (scalars)."""
        logits_c = extras["logits_c"]
        kind = target_kind(logits_c, target)
        branch_logits = [*extras["logits_homo"], *extras["logits_hetero"], logits_c]
        homo = self.homo_graph(extras["logits_homo"], extras["repr_homo"])
        hetero = self.hetero_graph(extras["logits_hetero"], extras["repr_hetero"])

        # Margin: three vectors per sample (l, v, a), each labelled with the sample's label.
        # Scores for regression, class indices for cls, (B, K) emotion bits for the binary tasks.
        labels = target.reshape(-1).float() if kind == "regression" else target.long()
        vectors = torch.stack(extras["c_sim"], dim=1)  # (B, 3, d)
        sample_labels = labels.repeat_interleave(3, dim=0)

        return {
            "task": sum(task_loss(logits, target) for logits in branch_logits),
            "homo_logit": homo["logit"],
            "homo_reg": homo["reg"],
            "homo_repr": homo["repr"],  # computed, but not part of the total (as in the reference)
            "hetero_logit": hetero["logit"],
            "hetero_repr": hetero["repr"],
            "hetero_reg": hetero["reg"],
            "recon": sum(F.mse_loss(r.float(), x.float()) for r, x in zip(extras["recon"], extras["features"])),
            "cycle": sum(F.mse_loss(c.float(), s.float())
                         for c, s in zip(extras["specific_cycle"], extras["specific"])),
            "margin": margin_loss(vectors.reshape(-1, vectors.shape[-1]), sample_labels, self.margin),
            "orthogonality": sum(orthogonality_loss(s, c, self.orthogonality_axis)
                                 for s, c in zip(extras["specific"], extras["common"])),
        }

    def combine_terms(self, terms: dict) -> torch.Tensor:
        """The weighted sum of the auxiliary terms (docs/design.md § DMD)."""
        return (terms["task"]
                + self.homo_distill_weight * (terms["homo_logit"] + terms["homo_reg"])
                + self.hetero_distill_weight * (terms["hetero_logit"] + terms["hetero_repr"] + terms["hetero_reg"])
                + self.decouple_weight * (terms["cycle"] + terms["recon"]
                                          + self.similarity_weight * (terms["margin"] + terms["orthogonality"])))

    def aux_loss(self, extras: dict, target: torch.Tensor) -> torch.Tensor:
        """The auxiliary loss added to the task loss of the fused logits (the backbone contract)."""
        return self.combine_terms(self.aux_terms(extras, target))


# --- the reference's weights ---------------------------------------------------------------------

# Official DMD parameter names -> ours, for the names that are not per-modality.
_OFFICIAL_FIXED = {"encoder_c.weight": "encoder_c.weight",
                   "proj1_c.weight": "common_head.proj1.weight", "proj1_c.bias": "common_head.proj1.bias",
                   "proj2_c.weight": "common_head.proj2.weight", "proj2_c.bias": "common_head.proj2.bias",
                   "out_layer_c.weight": "common_head.out_layer.weight", "out_layer_c.bias": "common_head.out_layer.bias",
                   "weight_c.weight": "gate_c.weight", "weight_c.bias": "gate_c.bias",
                   "proj1.weight": "fusion_head.proj1.weight", "proj1.bias": "fusion_head.proj1.bias",
                   "proj2.weight": "fusion_head.proj2.weight", "proj2.bias": "fusion_head.proj2.bias",
                   "out_layer.weight": "fusion_head.out_layer.weight", "out_layer.bias": "fusion_head.out_layer.bias"}
# Official per-modality prefixes -> ours ({m} is l, v or a).
_OFFICIAL_PER_MODALITY = {"proj_{m}.": "proj_{m}.", "encoder_s_{m}.": "encoder_s.{m}.", "decoder_{m}.": "decoder.{m}.",
                          "align_c_{m}.": "homo_heads.{m}.align.", "proj1_{m}_low.": "homo_heads.{m}.proj1.",
                          "proj2_{m}_low.": "homo_heads.{m}.proj2.", "out_layer_{m}_low.": "homo_heads.{m}.out_layer.",
                          "proj1_{m}_high.": "hetero_heads.{m}.proj1.", "proj2_{m}_high.": "hetero_heads.{m}.proj2.",
                          "out_layer_{m}_high.": "hetero_heads.{m}.out_layer.", "weight_{m}.": "gates.{m}.",
                          "self_attentions_c_{m}.": "common_encoders.{m}."}
_OFFICIAL_GRAPH = {"W_logit.": "logit_proj.", "W_repr.": "repr_proj.", "W_edge.": "edge_score."}
# Computed by the reference but in none of its losses, and the fairseq encoders' weightless buffers.
_OFFICIAL_UNUSED_PREFIXES = tuple(f"proj_cosine_{m}." for m in ORDER)
_OFFICIAL_UNUSED_SUFFIXES = (".version", ".embed_positions._float_tensor")
# Our homogeneous head's weights whose flattened (d·T) axis is 1 (columns) or 0 (rows, biases): the
# reference's head reads c_m flattened time-major. Its align_c layer reads c_m flattened channel-first,
# as ours does, so it is loaded as it is.
_HOMO_FLAT_AXIS = {"proj1.weight": 1, "proj2.weight": 0, "proj2.bias": 0, "out_layer.weight": 1}


def _official_to_ours(name: str) -> str | None:
    """Our name for an official model parameter, None for those we do not have."""
    if name in _OFFICIAL_FIXED:
        return _OFFICIAL_FIXED[name]
    if name.startswith("trans_"):  # MulT's crossmodal and memory encoders keep MulT's names
        return name
    for m in ORDER:
        for official, ours in _OFFICIAL_PER_MODALITY.items():
            prefix = official.format(m=m)
            if name.startswith(prefix):
                return ours.format(m=m) + name[len(prefix):]
    return None


def _official_graph_name(prefix: str, name: str) -> str | None:
    """Our name for a parameter of one of the reference's distillation units (prefix homo_graph. or hetero_graph.)."""
    for official, ours in _OFFICIAL_GRAPH.items():
        if name.startswith(official):
            return prefix + ours + name[len(official):]
    return None


def time_major_to_feature_major(tensor: torch.Tensor, axis: int, d_model: int, length: int) -> torch.Tensor:
    """Reorder a flattened (d·T) axis from the reference's index t·d + k to ours, k·T + t."""
    shape = tensor.shape
    split = tensor.reshape(*shape[:axis], length, d_model, *shape[axis + 1:])
    return split.transpose(axis, axis + 1).reshape(shape)


def load_official_state_dict(model: DMD, state_dict: dict, homo_gd_state_dict: dict | None,
                             hetero_gd_state_dict: dict | None) -> None:
    """Load the reference DMD's weights (its model and its two distillation units, under the
    reference's names) into `model`, strictly: every parameter of `model` must be given and every
    given tensor must have a place, except the reference's unused `proj_cosine_*` layers and its
    encoders' weightless buffers. The homogeneous heads' flattened axis is reordered (the reference
    flattens c_m time-major, we feature-major). A CheckpointError names every key that is missing,
    unexpected or of the wrong shape.

    A distillation unit given as None keeps `model`'s own weights: the reference saves its best model
    alone (`torch.save(model[0].state_dict())`), and the units only shape training, not predictions.
    """
    expected = model.state_dict()
    kept = {key: tensor for key, tensor in expected.items()
            if (homo_gd_state_dict is None and key.startswith("homo_graph."))
            or (hetero_gd_state_dict is None and key.startswith("hetero_graph."))}
    mapped, official_name, unexpected = {}, {}, []
    sources = (("state_dict", state_dict, _official_to_ours),
               ("homo_gd_state_dict", homo_gd_state_dict or {}, lambda name: _official_graph_name("homo_graph.", name)),
               ("hetero_gd_state_dict", hetero_gd_state_dict or {}, lambda name: _official_graph_name("hetero_graph.", name)))
    mapped.update(kept)
    for where, source, rename in sources:
        for name, tensor in source.items():
            if name.startswith(_OFFICIAL_UNUSED_PREFIXES) or name.endswith(_OFFICIAL_UNUSED_SUFFIXES):
                continue
            ours = rename(name)
            if ours is None or ours not in expected:
                unexpected.append(f"{where}[{name!r}]")
            else:
                mapped[ours], official_name[ours] = tensor, f"{where}[{name!r}]"

    d_model = model.encoder_c.weight.shape[0]
    for m in ORDER:
        for suffix, axis in _HOMO_FLAT_AXIS.items():
            key = f"homo_heads.{m}.{suffix}"
            if key in mapped and mapped[key].dim() > axis and mapped[key].shape[axis] == d_model * model.conv_lens[m]:
                mapped[key] = time_major_to_feature_major(mapped[key], axis, d_model, model.conv_lens[m])

    missing = [key for key in expected if key not in mapped]
    wrong_shape = [f"{official_name[key]} -> {key} (given {tuple(mapped[key].shape)}, this model has "
                   f"{tuple(expected[key].shape)})"
                   for key in expected if key in mapped and mapped[key].shape != expected[key].shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected official key(s): {', '.join(unexpected)}")
    if missing:
        problems.append(f"missing (our names): {', '.join(missing)}")
    if wrong_shape:
        problems.append(f"wrong shape: {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError("the official DMD weights do not fit this model (check that it was built with the "
                              "same dataset config and sequence lengths): " + " | ".join(problems))
    model.load_state_dict(mapped, strict=True)
