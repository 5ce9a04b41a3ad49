"""Checkpoints of the published code (docs/design.md): read without running, import, evaluate, start from.

The MULTModel fixture was written by the published code. CAUSALMER files, and MULTModels of other
configurations, are written here: stand-in nn.Modules with the published attribute layout are pickled by
torch.save through a Pickler that names them by the published class paths (nothing is registered under
those names while writing, and nothing could import them while reading).
"""
import json
import os
import pickle
import subprocess
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.errors import CheckpointError
from src.models.mult import CROSSMODAL_NAMES, MEMORY_NAMES, MulT
from src.run.published import (RefusedCheckpoint, import_published, init_from_published, init_record,
                                 plan_import, read_published, read_published_state_dict)

FIXTURE = "published_mult_init_iemocap.pt"
WEIGHTLESS = (".version", ".embed_positions._float_tensor")


# ------------------------------------------------------------------------------- writing published files
class PublishedName:
    """Stand-in classes and the published global each is pickled as."""
    names = {}

    @classmethod
    def register(cls, module, name):
        def decorate(klass):
            cls.names[klass] = (module, name)
            return klass
        return decorate


class _PublishedPickler(pickle._Pickler):
    """Writes the registered stand-ins as GLOBAL '<published module> <name>'."""

    def save_global(self, obj, name=None):
        if obj in PublishedName.names:
            module, qualname = PublishedName.names[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


PUBLISHED_PICKLE = types.SimpleNamespace(__name__="published_pickle", Pickler=_PublishedPickler, dump=pickle.dump,
                                         load=pickle.load, Unpickler=pickle.Unpickler)


def save_published(model, path, legacy=False):
    torch.save(model, path, pickle_module=PUBLISHED_PICKLE, _use_new_zipfile_serialization=not legacy)
    return path


@PublishedName.register("src.models", "MULTModel")
class FakeMULTModel(nn.Module):
    pass


@PublishedName.register("modules.transformer", "TransformerEncoder")
class FakeTransformerEncoder(nn.Module):
    pass


@PublishedName.register("modules.transformer", "TransformerEncoderLayer")
class FakeTransformerEncoderLayer(nn.Module):
    pass


@PublishedName.register("modules.multihead_attention", "MultiheadAttention")
class FakeMultiheadAttention(nn.Module):
    pass


@PublishedName.register("modules.position_embedding", "SinusoidalPositionalEmbedding")
class FakeSinusoidalPositionalEmbedding(nn.Module):
    pass


@PublishedName.register("src.causal_mer_model", "CAUSALMER")
class FakeCAUSALMER(nn.Module):
    pass


@PublishedName.register("src.model_t", "AlbertTextModel")
class FakeAlbertTextModel(nn.Module):
    def forward(self, x):  # the published text branch: mean of ALBERT's last hidden state
        return self.text_mlp(self.model(inputs_embeds=self.linear_transformation(x)).last_hidden_state.mean(dim=1))


@PublishedName.register("src.model_a", "AudioModel")
class FakeAudioModel(nn.Module):
    pass


@PublishedName.register("src.model_v", "VisionModel")
class FakeVisionModel(nn.Module):
    pass


@PublishedName.register("torchvision.models.resnet", "ResNet")
class FakeResNet(nn.Module):
    pass


@PublishedName.register("torchvision.models.resnet", "BasicBlock")
class FakeBasicBlock(nn.Module):
    pass


MULT_ATTRIBUTES = dict(num_heads=10, layers=2, attn_dropout=0.3, attn_dropout_a=0.15, attn_dropout_v=0.05,
                       relu_dropout=0.2, res_dropout=0.05, out_dropout=0.15, embed_dropout=0.35, attn_mask=True)


def published_mult(dims=(300, 74, 35), kernels=(1, 3, 3), d_model=20, output_dim=8, dataset="iemocap", seed=0,
                   **attributes):
    """(a MULTModel in the published layout, the project's MulT with the same weights)."""
    attrs = {**MULT_ATTRIBUTES, **attributes}
    torch.manual_seed(seed)
    reference = MulT(orig_dims=dims, kernel_sizes=kernels, d_model=d_model, output_dim=output_dim,
                     use_configured_heads=attrs["num_heads"] != 10, **attrs).eval()
    with torch.no_grad():  # non-zero biases, so that a mis-mapped bias shows
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    fake = FakeMULTModel()
    for m, dim in zip("lav", dims):
        setattr(fake, f"orig_d_{m}", dim)
        setattr(fake, f"d_{m}", d_model)
    fake.vonly = fake.aonly = fake.lonly = True
    for key, value in attrs.items():
        setattr(fake, key, value)
    fake.dataset, fake.partial_mode = dataset, 3
    for m, dim, k in zip("lav", dims, kernels):
        setattr(fake, f"proj_{m}", nn.Conv1d(dim, d_model, kernel_size=k, padding=0, bias=False))
    by_source = {"l": attrs["attn_dropout"], "a": attrs["attn_dropout_a"], "v": attrs["attn_dropout_v"]}
    for name in CROSSMODAL_NAMES + MEMORY_NAMES:
        memory = name in MEMORY_NAMES
        width = 2 * d_model if memory else d_model
        encoder = FakeTransformerEncoder()
        encoder.dropout, encoder.attn_dropout = attrs["embed_dropout"], attrs["attn_dropout"] if memory else by_source[name[-1]]
        encoder.embed_dim, encoder.embed_scale, encoder.attn_mask, encoder.normalize = width, width ** 0.5, attrs["attn_mask"], True
        encoder.register_buffer("version", torch.Tensor([2]))
        positions = FakeSinusoidalPositionalEmbedding()
        positions.embedding_dim, positions.padding_idx, positions.left_pad, positions.weights = width, 0, 0, {}
        positions.register_buffer("_float_tensor", torch.FloatTensor(1))
        encoder.embed_positions = positions
        blocks = []
        for _ in range(max(attrs["layers"], 3) if memory else attrs["layers"]):
            block = FakeTransformerEncoderLayer()
            block.embed_dim, block.num_heads, block.attn_mask = width, attrs["num_heads"], attrs["attn_mask"]
            block.relu_dropout, block.res_dropout, block.normalize_before = attrs["relu_dropout"], attrs["res_dropout"], True
            attention = FakeMultiheadAttention()
            attention.embed_dim, attention.num_heads, attention.attn_dropout = width, attrs["num_heads"], encoder.attn_dropout
            attention.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            attention.in_proj_bias = nn.Parameter(torch.empty(3 * width))
            attention.out_proj = nn.Linear(width, width)
            block.self_attn = attention
            block.fc1, block.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            block.layer_norms = nn.ModuleList([nn.LayerNorm(width), nn.LayerNorm(width)])
            blocks.append(block)
        encoder.layers = nn.ModuleList(blocks)
        encoder.layer_norm = nn.LayerNorm(width)
        setattr(fake, name, encoder)
    fake.proj1, fake.proj2 = nn.Linear(6 * d_model, 6 * d_model), nn.Linear(6 * d_model, 6 * d_model)
    fake.out_layer = nn.Linear(6 * d_model, output_dim)
    result = fake.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith(WEIGHTLESS) for k in result.missing_keys)
    return fake.eval(), reference


def torchvision_resnet18(width, output_dim, seed):
    """A ResNet-18 under torchvision's names (conv1, bn1, layerN.M, downsample, fc) with conv1 for one channel,
    random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    net = FakeResNet()
    net.conv1 = nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False)
    net.bn1, net.relu, net.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    channels = width
    for stage, stride in enumerate((1, 2, 2, 2), start=1):
        out = width * 2 ** (stage - 1)
        blocks = []
        for index in range(2):
            block = FakeBasicBlock()
            s = stride if index == 0 else 1
            block.conv1 = nn.Conv2d(channels, out, 3, s, 1, bias=False)
            block.bn1, block.relu = nn.BatchNorm2d(out), nn.ReLU(inplace=True)
            block.conv2, block.bn2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
            block.downsample = (nn.Sequential(nn.Conv2d(channels, out, 1, s, bias=False), nn.BatchNorm2d(out))
                                if s != 1 or channels != out else None)
            block.stride = s
            blocks.append(block)
            channels = out
        setattr(net, f"layer{stage}", nn.Sequential(*blocks))
    net.avgpool, net.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(channels, output_dim)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def torchvision_forward(net, x):
    """torchvision's ResNet forward, written out: the (L x d) matrix is a one-channel image."""
    x = net.maxpool(F.relu(net.bn1(net.conv1(x.unsqueeze(1)))))
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            identity = x if block.downsample is None else block.downsample(x)
            out = F.relu(block.bn1(block.conv1(x)))
            x = F.relu(block.bn2(block.conv2(out)) + identity)
    return net.fc(torch.flatten(net.avgpool(x), 1))


TINY_ALBERT = dict(vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=40, hidden_act="gelu_new")


def published_causalmer(fusion="hm", constants=(0.3, -0.2, 0.45), width=8, output_dim=8, seed=0):
    """(a CAUSALMER in the published layout, the project's MulT with its backbone's weights)."""
    transformers = pytest.importorskip("transformers")
    tav, reference = published_mult(seed=seed, output_dim=output_dim)
    model = FakeCAUSALMER()
    model.tav_branch = tav
    torch.manual_seed(seed + 1)
    text = FakeAlbertTextModel()
    albert_config = transformers.AlbertConfig(**TINY_ALBERT)
    text.linear_transformation = nn.Linear(300, albert_config.embedding_size)
    text.model = transformers.AlbertModel(albert_config)
    text.text_mlp = nn.Linear(albert_config.hidden_size, output_dim)
    model.t_branch = text
    model.a_branch, model.v_branch = FakeAudioModel(), FakeVisionModel()
    model.a_branch.a_branch = torchvision_resnet18(width, output_dim, seed + 2)
    model.v_branch.v_branch = torchvision_resnet18(width, output_dim, seed + 3)
    for name, value in zip(("constant_t", "constant_a", "constant_v"), constants):
        setattr(model, name, nn.Parameter(torch.tensor(value)))
    model.fusion_mode = fusion
    return model.eval(), reference


def published_causal_outputs(model, reference, text, audio, vision):
    """The published CAUSALMER's eval outputs, computed here: CF-VQA fusion with its constants (docs/design.md § The causal head)."""
    eps = 1e-12
    fusions = {
        "mask": lambda m, t, a, v: m * torch.sigmoid(t + a + v),
        "sum": lambda m, t, a, v: torch.log(torch.sigmoid(m + t + a + v) + eps),
        "hm": lambda m, t, a, v: (lambda p: torch.log(p + eps) - torch.log1p(p))(
            torch.sigmoid(m) * torch.sigmoid(t) * torch.sigmoid(a) * torch.sigmoid(v)),
        "tanh": lambda m, t, a, v: m + torch.tanh(t) + torch.tanh(a) + torch.tanh(v),
    }
    h = fusions[model.fusion_mode]
    z_m = reference(text, audio, vision)[0]
    z_t = model.t_branch(text)
    z_a = torchvision_forward(model.a_branch.a_branch, audio)
    z_v = torchvision_forward(model.v_branch.v_branch, vision)
    c_t, c_a, c_v = (float(getattr(model, f"constant_{m}")) for m in "tav")

    def c(value):
        return torch.full_like(z_m, value)

    y_all = h(z_m, z_t, z_a, z_v)
    y_t, y_a, y_v = h(c(c_t), z_t, c(c_t), c(c_t)), h(c(c_a), c(c_a), z_a, c(c_a)), h(c(c_v), c(c_v), c(c_v), z_v)
    y_0 = h(*[c(c_t + c_a + c_v)] * 4)
    return {"logits_causal_mer": y_all - y_t - y_a - y_v + 2 * y_0, "logits_te": y_all, "logits_m": z_m,
            "logits_t": z_t, "logits_a": z_a, "logits_v": z_v}


def random_inputs(batch=3, lengths=(20, 20, 20), dims=(300, 74, 35), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, dim, generator=generator) for length, dim in zip(lengths, dims)]


# ------------------------------------------------------------------------------- the fixture
@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return torch.load(fixtures_dir / "published_mult_init_iemocap.expected.pt", weights_only=True)


def test_fixture_reads_as_its_state_dict(fixtures_dir, expected):
    state = read_published_state_dict(fixtures_dir / FIXTURE)
    assert list(state) == list(expected["state_dict"])
    for key, tensor in expected["state_dict"].items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def test_fixture_imports_as_mult_with_its_logits(fixtures_dir, expected):
    model = import_published(fixtures_dir / FIXTURE, "iemocap")
    assert isinstance(model, MulT) and not model.training
    with torch.no_grad():
        logits, _ = model(**expected["inputs"])
    assert torch.allclose(logits, expected["logits"], atol=1e-5, rtol=0)


def test_fixture_hyperparameters_come_from_the_record(fixtures_dir):
    plan = plan_import(read_published(fixtures_dir / FIXTURE), "iemocap", FIXTURE)
    assert plan["kind"] == "mult" and plan["task"] == "binary" and plan["dims"] == (300, 74, 35)
    assert plan["model"]["backbone_params"] == dict(
        d_model=40, layers=5, attn_dropout=0.2, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.1,
        res_dropout=0.1, embed_dropout=0.25, out_dropout=0.1, attn_mask=True, kernel_sizes=[3, 5, 3],
        num_heads=10, use_configured_heads=False)


def test_fixture_for_another_dataset_is_refused(fixtures_dir):
    with pytest.raises(CheckpointError, match="for iemocap, not mosi: pass --dataset iemocap"):
        import_published(fixtures_dir / FIXTURE, "mosi")


# ------------------------------------------------------------------------------- MULTModels written here
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_other_mult_configuration_is_recovered_from_its_attributes(tmp_path, legacy):
    fake, reference = published_mult(dims=(300, 5, 20), kernels=(1, 3, 3), d_model=20, output_dim=7,
                                      dataset="mosi", layers=2)
    path = save_published(fake, tmp_path / "mult.pt", legacy=legacy)
    state = read_published_state_dict(path)
    assert list(state) == list(fake.state_dict())
    assert all(torch.equal(state[k], v) for k, v in fake.state_dict().items())
    plan = plan_import(read_published(path), "mosi", str(path))
    assert plan["task"] == "cls"
    params = plan["model"]["backbone_params"]
    assert params["kernel_sizes"] == [1, 3, 3] and params["layers"] == 2 and params["d_model"] == 20
    assert {k: params[k] for k in MULT_ATTRIBUTES if k != "num_heads"} == \
        {k: v for k, v in MULT_ATTRIBUTES.items() if k not in ("num_heads", "layers")} | {"layers": 2}
    model = import_published(path, "mosi")
    inputs = random_inputs(lengths=(12, 15, 9), dims=(300, 5, 20))
    with torch.no_grad():
        assert torch.allclose(model(*inputs)[0], reference(*inputs)[0], atol=1e-5, rtol=0)


def test_head_count_comes_from_the_attention_records(tmp_path):
    fake, reference = published_mult(num_heads=4)
    path = save_published(fake, tmp_path / "mult.pt")
    params = plan_import(read_published(path), "iemocap", str(path))["model"]["backbone_params"]
    assert params["num_heads"] == 4 and params["use_configured_heads"] is True
    inputs = random_inputs()
    with torch.no_grad():
        assert torch.allclose(import_published(path, "iemocap")(*inputs)[0], reference(*inputs)[0], atol=1e-5, rtol=0)


def test_encoder_that_disagrees_with_its_mult_attributes_is_refused(tmp_path):
    fake, _ = published_mult()
    fake.trans_v_with_a.attn_dropout = 0.5  # v <- a follows attn_dropout_a (0.15)
    path = save_published(fake, tmp_path / "mult.pt")
    with pytest.raises(CheckpointError, match="trans_v_with_a has attn_dropout=0.5"):
        import_published(path, "iemocap")


def test_partial_mult_is_refused(tmp_path):
    fake, _ = published_mult()
    fake.aonly = False
    path = save_published(fake, tmp_path / "mult.pt")
    with pytest.raises(CheckpointError, match="aonly=False"):
        import_published(path, "iemocap")


# ------------------------------------------------------------------------------- CAUSALMER
@pytest.mark.parametrize("fusion", ["hm", "mask", "sum", "tanh"])
def test_causalmer_import_equals_the_published_forward(tmp_path, fusion):
    from src.causal import CausalMER
    from src.models.albert import AlbertBranch
    from src.models.branches import ResNet18Branch

    fake, reference = published_causalmer(fusion=fusion)
    path = save_published(fake, tmp_path / "causalmer.pt")
    state = read_published_state_dict(path)
    assert list(state) == list(fake.state_dict())  # ALBERT's non-persistent index buffers excluded, as torch does
    differing = {k: (state[k], v) for k, v in fake.state_dict().items()
                 if not torch.equal(state[k], v) and not k.endswith(WEIGHTLESS)}  # uninitialised: NaN at times
    assert not differing, differing

    model = import_published(path, "iemocap")
    assert isinstance(model, CausalMER) and model.head.fusion == fusion and not model.training
    assert isinstance(model.text_branch, AlbertBranch) and model.text_branch.albert.config.hidden_size == 32
    assert isinstance(model.audio_branch, ResNet18Branch) and model.audio_branch.fc.in_features == 64  # width 8
    inputs = random_inputs()
    with torch.no_grad():
        want = published_causal_outputs(fake, reference, *inputs)
        got = model(*inputs)
    assert torch.allclose(got["logits_tie"], want["logits_causal_mer"], atol=1e-5, rtol=0)
    for key in ("logits_te", "logits_m", "logits_t", "logits_a", "logits_v"):
        assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), key
    assert [model.head.constant_t.item(), model.head.constant_a.item(), model.head.constant_v.item()] == \
        pytest.approx([0.3, -0.2, 0.45])


def test_causalmer_with_unknown_fusion_is_refused(tmp_path):
    fake, _ = published_causalmer()
    fake.fusion_mode = "rubi"
    path = save_published(fake, tmp_path / "causalmer.pt")
    with pytest.raises(CheckpointError, match="fusion_mode is 'rubi'"):
        import_published(path, "iemocap")


# ------------------------------------------------------------------------------- files that would run code
class _Payload:
    """Unpickles as `call(*args)`: what a malicious checkpoint does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _touch(target):
    return {"os.system": (os.system, (f"touch {target}",)),
            "builtins.open": (open, (str(target), "w")),
            "subprocess.call": (subprocess.call, (["touch", str(target)],))}


@pytest.mark.parametrize("attack", ["os.system", "builtins.open", "subprocess.call"])
def test_payload_at_the_top_is_refused_and_does_not_run(tmp_path, attack):
    target = tmp_path / "created"
    call, args = _touch(target)[attack]
    path = tmp_path / "evil.pt"
    torch.save(_Payload(call, *args), path)
    with pytest.raises(RefusedCheckpoint, match=f"'{call.__module__}.{call.__name__}'"):
        read_published_state_dict(path)
    assert not target.exists()
    # The payload is real: an ordinary unpickling runs it.
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("attack", ["os.system", "builtins.open", "subprocess.call"])
def test_payload_nested_in_a_module_is_refused_and_does_not_run(tmp_path, attack):
    target = tmp_path / "created"
    call, args = _touch(target)[attack]
    fake, _ = published_mult()
    fake.trans_l_with_a.layers[0].extra = _Payload(call, *args)  # an attribute deep in the tree
    path = save_published(fake, tmp_path / "evil.pt")
    with pytest.raises(RefusedCheckpoint, match=f"'{call.__module__}.{call.__name__}'"):
        import_published(path, "iemocap")
    assert not target.exists()


def test_module_whose_state_holds_a_callable_is_refused(tmp_path):
    target = tmp_path / "created"
    fake, _ = published_mult()
    fake.__dict__["hook"] = os.system  # a function where only data belongs
    path = save_published(fake, tmp_path / "evil.pt")
    with pytest.raises(RefusedCheckpoint, match=f"'{os.system.__module__}.system'"):
        read_published(path)
    assert not target.exists()


@pytest.mark.parametrize("value, named", [(OrderedDict, "collections.OrderedDict"),
                                          (FakeMULTModel, "src.models.MULTModel")])
def test_admitted_global_as_a_value_is_refused(tmp_path, value, named):
    fake, _ = published_mult()
    fake.trans_a_mem.__dict__["factory"] = value  # a class itself, not an object built from it
    path = save_published(fake, tmp_path / "evil.pt")
    with pytest.raises(RefusedCheckpoint, match=f"the global '{named}' itself"):
        read_published(path)


def test_module_class_called_with_arguments_is_refused(tmp_path):
    fake, _ = published_mult()
    fake._modules["proj_l"] = _Payload(FakeMULTModel, "touch x")  # a constructor called with arguments
    path = save_published(fake, tmp_path / "evil.pt")
    with pytest.raises(RefusedCheckpoint, match="calls the global 'src.models.MULTModel'"):
        read_published(path)


def test_hooks_in_a_module_are_refused(tmp_path):
    fake, _ = published_mult()
    fake.proj1._forward_hooks[0] = FakeMULTModel()  # a "hook": an inert record, but not a plain module tree
    path = save_published(fake, tmp_path / "evil.pt")
    with pytest.raises(RefusedCheckpoint, match="_forward_hooks"):
        read_published(path)


def test_non_model_and_corrupt_files_are_clear_errors(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(RefusedCheckpoint, match="does not hold a pickled model"):
        read_published(path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.pt"):
        read_published(broken)
    with pytest.raises(CheckpointError, match="not found"):
        read_published(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------- --init-from
def _config(model_name="causalmer", branches=None, backbone="mult", overrides=()):
    from src.run.config import load_config

    overrides = [f"model.branches.{m}={json.dumps(b)}" for m, b in (branches or {}).items()] + list(overrides)
    return load_config("iemocap", model_name=model_name, backbone=backbone, overrides=overrides)


def test_init_from_a_mult_file_sets_the_backbone_only(fixtures_dir, expected):
    from src.run.build import build_model

    cfg = _config()
    torch.manual_seed(7)  # the file was initialised with seed 0, which the project's MulT reproduces
    model = build_model(cfg, (300, 74, 35), (20, 20, 20), 8)
    text_before = {k: v.clone() for k, v in model.text_branch.state_dict().items()}
    assert not torch.equal(model.backbone.proj_l.weight, expected["state_dict"]["proj_l.weight"])
    init_from_published(model, init_record(fixtures_dir / FIXTURE), "iemocap")
    assert torch.equal(model.backbone.proj_l.weight, expected["state_dict"]["proj_l.weight"])
    assert torch.equal(model.backbone.state_dict()["trans_v_mem.layers.4.fc2.bias"],
                       expected["state_dict"]["trans_v_mem.layers.4.fc2.bias"])
    assert all(torch.equal(v, text_before[k]) for k, v in model.text_branch.state_dict().items())


def test_init_from_a_causalmer_file_sets_matching_branches_and_constants(tmp_path):
    from src.run.build import build_model

    fake, _ = published_causalmer()
    path = save_published(fake, tmp_path / "causalmer.pt")
    cfg = _config(branches={"text": {"kind": "pool"}, "audio": {"kind": "resnet18", "width": 8},
                            "vision": {"kind": "pool"}},
                  overrides=["model.backbone_params.layers=2", "model.backbone_params.d_model=20",
                             "model.backbone_params.kernel_sizes=[1, 3, 3]"])
    model = build_model(cfg, (300, 74, 35), (20, 20, 20), 8)
    pool_before = {k: v.clone() for k, v in model.vision_branch.state_dict().items()}
    init_from_published(model, init_record(path), "iemocap")
    assert torch.equal(model.audio_branch.stem[0].weight, fake.a_branch.a_branch.conv1.weight)
    assert torch.equal(model.audio_branch.stages[2].shortcut[1].running_var,
                       fake.a_branch.a_branch.layer2[0].downsample[1].running_var)
    assert all(torch.equal(v, pool_before[k]) for k, v in model.vision_branch.state_dict().items())
    assert model.head.constant_a.item() == pytest.approx(-0.2)


def test_init_from_refuses_a_changed_file_and_another_backbone(fixtures_dir, tmp_path):
    from src.run.build import build_model

    copy = tmp_path / "init.pt"
    copy.write_bytes((fixtures_dir / FIXTURE).read_bytes())
    record = init_record(copy)
    cfg = _config()
    model = build_model(cfg, (300, 74, 35), (20, 20, 20), 8)
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="has changed"):
        init_from_published(model, record, "iemocap")
    pmr = build_model(_config(backbone="pmr"), (300, 74, 35), (20, 20, 20), 8)
    with pytest.raises(CheckpointError, match="backbone is a PMR"):
        init_from_published(pmr, init_record(fixtures_dir / FIXTURE), "iemocap")


# ------------------------------------------------------------------------------- command line
def _main(*argv):
    import main

    return main.main([str(a) for a in argv])


@pytest.mark.slow
def test_cli_import_of_the_fixture_then_eval_sweep_and_analyze(fixtures_dir, expected, synthetic_data, tmp_path):
    import hashlib

    import yaml
    from src.run.trained import load_run

    data_dir, runs = synthetic_data("iemocap"), tmp_path / "runs"
    command = ["import-checkpoint", fixtures_dir / FIXTURE, "--dataset", "iemocap", "--name", "pub",
               "--runs-dir", runs, "--data-dir", data_dir]
    assert _main(*command) == 0
    run = runs / "iemocap" / "pub" / "seed1"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "backbone" and cfg["model"]["backbone_params"]["kernel_sizes"] == [3, 5, 3]
    assert cfg["model"]["init_from"]["sha256"] == hashlib.sha256((fixtures_dir / FIXTURE).read_bytes()).hexdigest()
    for which in ("best_acc", "best_loss"):  # how eval rebuilds the run gives the published logits
        _, _, model, _ = load_run(run, which, torch.device("cpu"))
        with torch.no_grad():
            logits = model.eval()(**expected["inputs"])["logits_m"]
        assert torch.allclose(logits, expected["logits"], atol=1e-5, rtol=0)
    evaluate = ["eval", "--dataset", "iemocap", "--name", "pub", "--runs-dir", runs, "--device", "cpu"]
    assert _main(*evaluate, "--remove", "sweep") == 0
    assert set(json.loads((run / "robustness_best_acc_test.json").read_text())["removals"]) == \
        {"t", "a", "v", "ta", "tv", "av"}
    assert _main("analyze", run, "--device", "cpu") == 0
    assert "shapley" in json.loads((run / "analysis.json").read_text())["pub/seed1"]
    assert _main(*command) == 2  # the run exists: refused, nothing overwritten


@pytest.mark.slow
def test_cli_import_of_a_causalmer_then_eval(synthetic_data, tmp_path):
    from src.run.trained import load_run

    fake, reference = published_causalmer(fusion="mask")
    path = save_published(fake, tmp_path / "causalmer_best_valid_acc.pt")
    data_dir, runs = synthetic_data("iemocap"), tmp_path / "runs"
    assert _main("import-checkpoint", path, "--dataset", "iemocap", "--name", "cm", "--runs-dir", runs,
                 "--data-dir", data_dir) == 0
    run = runs / "iemocap" / "cm" / "seed1"
    _, splits, model, _ = load_run(run, "best_acc", torch.device("cpu"))
    inputs = random_inputs()
    with torch.no_grad():
        got, want = model.eval()(*inputs), published_causal_outputs(fake, reference, *inputs)
    assert torch.allclose(got["logits_tie"], want["logits_causal_mer"], atol=1e-5, rtol=0)
    assert _main("eval", "--dataset", "iemocap", "--name", "cm", "--runs-dir", runs, "--device", "cpu",
                 "--remove", "a") == 0
    result = json.loads((run / "eval_best_acc_test_no_a.json").read_text())
    assert {"tie", "te", "m"} <= set(result["predictions"])


def test_cli_train_init_from_starts_from_the_file(fixtures_dir, expected, synthetic_data, tmp_path):
    import yaml

    data_dir, runs = synthetic_data("iemocap"), tmp_path / "runs"
    # Learning rate 0: the trained weights are the initial ones, so the checkpoint shows what the run started from.
    assert _main("train", "--dataset", "iemocap", "--name", "init", "--runs-dir", runs, "--data-dir", data_dir,
                 "--device", "cpu", "--model", "mult", "--epochs", 1, "--set", "train.lr.backbone=0",
                 "--init-from", fixtures_dir / FIXTURE) == 0
    run = runs / "iemocap" / "init" / "seed1"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_from"]["path"] == \
        str((fixtures_dir / FIXTURE).resolve())
    state = torch.load(run / "best_loss.pt", weights_only=True)["model"]
    for key in ("proj_l.weight", "trans_a_with_v.layers.3.fc1.weight", "out_layer.bias"):
        assert torch.equal(state[f"backbone.{key}"], expected["state_dict"][key]), key


def test_cli_init_from_a_file_that_is_not_a_published_model_is_refused(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    torch.save({"proj_l.weight": torch.zeros(1)}, bad)
    assert _main("train", "--dataset", "iemocap", "--name", "x", "--runs-dir", tmp_path / "runs", "--device", "cpu",
                 "--init-from", bad) == 2
    assert "does not hold a pickled model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- what a file may declare
class _Reduces:
    def __init__(self, *reduction):
        self.reduction = reduction

    def __reduce__(self):
        return self.reduction


def test_module_that_contains_itself_is_refused(tmp_path):
    fake, _ = published_mult()
    fake.proj1._modules["loop"] = fake
    path = save_published(fake, tmp_path / "loop.pt")
    with pytest.raises(RefusedCheckpoint, match="proj1.loop contains itself"):
        read_published_state_dict(path)


def test_a_deep_module_chain_is_read_without_recursion(tmp_path):
    import sys

    head = link = nn.Module()
    for _ in range(3 * sys.getrecursionlimit()):
        link.next = nn.Module()
        link = link.next
    link.out = nn.Linear(2, 1)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # only the writer recurses
    try:
        torch.save(head, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    state = read_published_state_dict(tmp_path / "deep.pt")
    assert list(state) == ["next." * (3 * limit) + "out.weight", "next." * (3 * limit) + "out.bias"]
    assert torch.equal(state["next." * (3 * limit) + "out.weight"], link.out.weight.detach())


def _legacy_file(path, body: bytes) -> bytes:
    """A legacy torch.save file whose object pickle is `body`."""
    legacy_magic = 0x1950A86A20F9469CFC6C  # what torch's legacy format starts with
    path.write_bytes(pickle.dumps(legacy_magic, protocol=2) + pickle.dumps(1001, protocol=2)
                     + pickle.dumps({"little_endian": True}, protocol=2) + body)
    return path


def test_legacy_file_declaring_a_huge_string_is_refused(tmp_path):
    import struct

    path = _legacy_file(tmp_path / "huge.pt", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc")
    with pytest.raises(CheckpointError, match="declares a size its bytes do not hold"):
        read_published(path)


def test_legacy_file_declaring_a_huge_storage_is_refused(tmp_path):
    import io
    import struct

    storage = object()

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 1 << 40) if obj is storage else None

    def dumped(obj):
        buffer = io.BytesIO()
        Writer(buffer, protocol=2).dump(obj)
        return buffer.getvalue()

    tensor = _Reduces(torch._utils._rebuild_tensor_v2, (storage, 0, (1 << 40,), (1,), False, OrderedDict()))
    body = dumped(tensor) + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 1 << 40) + bytes(64)
    with pytest.raises(CheckpointError, match="truncated or corrupt at storage 0"):
        read_published(_legacy_file(tmp_path / "huge.pt", body))


def test_widths_declared_through_an_overlapping_view_are_refused(tmp_path):
    fake, _ = published_mult()
    for m, dim, kernel in zip("lav", (300, 74, 35), (1, 3, 3)):  # each projection one element, seen 10^7 times
        setattr(fake, f"d_{m}", 100_000)
        getattr(fake, f"proj_{m}")._parameters["weight"] = nn.Parameter(torch.zeros(1).expand(100_000, dim, kernel))
    path = save_published(fake, tmp_path / "wide.pt")
    with pytest.raises(RefusedCheckpoint, match=r"\(30000000 elements\) views a storage of 1 elements"):
        import_published(path, "iemocap")


def test_widths_the_tensors_do_not_have_are_refused_before_a_model_is_built(tmp_path, monkeypatch):
    import src.run.published as published

    fake, _ = published_mult()
    for m, dim, kernel in zip("lav", (300, 74, 35), (1, 3, 3)):  # projections 2000 wide, encoders 20
        setattr(fake, f"d_{m}", 2000)
        getattr(fake, f"proj_{m}")._parameters["weight"] = nn.Parameter(torch.zeros(2000, dim, kernel))
    path = save_published(fake, tmp_path / "wide.pt")
    devices = []

    def recording(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return build_model(*args, **kwargs)

    build_model = published.build_model
    monkeypatch.setattr(published, "build_model", recording)
    with pytest.raises(CheckpointError, match="does not fit the model: .*trans_l_with_a"):
        import_published(path, "iemocap")
    assert devices == ["meta"]  # a MulT of width 2000 (5 GB) was never allocated


# ------------------------------------------------------------------------------- weights refused at the door
def _with_bias(tensor_of):
    fake, _ = published_mult()
    fake.proj1._parameters["bias"] = nn.Parameter(tensor_of(fake.proj1.bias.detach()), requires_grad=False)
    return fake


BAD_WEIGHTS = {
    "nan": (lambda b: torch.cat([b[:-1], torch.tensor([float("nan")])]), "holds 1 NaN or inf"),
    "inf": (lambda b: torch.cat([b[:-1], torch.tensor([float("inf")])]), "holds 1 NaN or inf"),
    "float64 beyond float32": (lambda b: torch.cat([b[:-1].double(), torch.tensor([1e300], dtype=torch.float64)]),
                               r"holds values up to 1e\+300, beyond float32"),
    "complex": (lambda b: b.to(torch.complex64) * (1 + 1j), "is complex"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_non_finite_or_lossy_weights_are_refused_naming_the_tensor(tmp_path, case):
    from src.run.build import build_model

    tensor_of, fragment = BAD_WEIGHTS[case]
    path = save_published(_with_bias(tensor_of), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"the weight proj1.bias {fragment}"):
        import_published(path, "iemocap")
    model = build_model(_config(model_name="backbone", overrides=[
        "model.backbone_params.layers=2", "model.backbone_params.d_model=20",
        "model.backbone_params.kernel_sizes=[1, 3, 3]"]), (300, 74, 35), (20, 20, 20), 8)
    with pytest.raises(CheckpointError, match=f"the weight backbone.proj1.bias {fragment}|proj1.bias {fragment}"):
        init_from_published(model, init_record(path), "iemocap")


# ------------------------------------------------------------------------------- the official DMD's weights
def test_official_dmd_weights_import_as_dmd_alone_with_the_official_outputs(fixtures_dir, tmp_path):
    from src.models.dmd import DMD
    from src.run.published import build_imported, published_run_config

    fixture = torch.load(fixtures_dir / "dmd_mosei_official.pt", weights_only=True)
    path = tmp_path / "dmd.pth"
    torch.save(fixture["state_dict"], path)  # what the official code writes: its DMD's state_dict alone
    cfg, plan = published_run_config(path, "mosei_senti")
    assert plan["kind"] == "dmd" and cfg["model"]["name"] == "backbone" and cfg["model"]["backbone"] == "dmd"
    assert plan["seq_lens"] == tuple(fixture["seq_lens"]) and cfg["data"]["task"] == "regression"
    model = build_imported(plan, cfg["loss"])
    assert isinstance(model.backbone, DMD)
    with torch.no_grad():
        logits = model(**fixture["inputs"])["logits_m"]
    assert torch.allclose(logits, fixture["outputs"]["output_logit"], atol=1e-5, rtol=0)


def test_a_state_dict_that_is_not_dmds_is_refused(tmp_path):
    from src.run.published import published_run_config

    path = tmp_path / "weights.pt"
    torch.save({"proj_l.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not the official DMD's"):
        published_run_config(path, "mosei_senti")


@pytest.mark.slow
def test_cli_import_of_official_dmd_weights_then_eval(fixtures_dir, synthetic_data, tmp_path):
    fixture = torch.load(fixtures_dir / "dmd_mosei_official.pt", weights_only=True)
    path = tmp_path / "dmd.pth"
    torch.save(fixture["state_dict"], path)
    data_dir, runs = synthetic_data("mosei_senti"), tmp_path / "runs"
    assert _main("import-checkpoint", path, "--dataset", "mosei_senti", "--name", "dmd", "--runs-dir", runs,
                 "--data-dir", data_dir) == 0
    assert _main("eval", "--dataset", "mosei_senti", "--name", "dmd", "--runs-dir", runs, "--device", "cpu") == 0
    run = runs / "mosei_senti" / "dmd" / "seed1"
    assert "m" in json.loads((run / "eval_best_acc_test.json").read_text())["predictions"]


# ------------------------------------------------------------------------------- failures leave nothing
def test_cli_import_of_non_finite_weights_writes_nothing(tmp_path, capsys):
    path = save_published(_with_bias(BAD_WEIGHTS["nan"][0]), tmp_path / "bad.pt")
    assert _main("import-checkpoint", path, "--dataset", "iemocap", "--name", "x", "--runs-dir", tmp_path / "runs") == 2
    assert "proj1.bias holds 1 NaN" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_import_on_a_full_disk_leaves_no_partial_run(fixtures_dir, tmp_path, monkeypatch, capsys):
    from src.run import checkpoint as ckpt_io

    import errno

    def full_disk(obj, handle):
        handle.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    runs = tmp_path / "runs"
    assert _main("import-checkpoint", fixtures_dir / FIXTURE, "--dataset", "iemocap", "--name", "x",
                 "--runs-dir", runs) == 2
    err = capsys.readouterr().err
    assert "best_acc.pt" in err and "no space left" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    run = runs / "iemocap" / "x" / "seed1"
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no config, no checkpoint, no temporary


def test_cli_init_from_run_resumes_after_the_file_moved(fixtures_dir, synthetic_data, tmp_path):
    copy = tmp_path / "published.pt"
    copy.write_bytes((fixtures_dir / FIXTURE).read_bytes())
    common = ["train", "--dataset", "iemocap", "--name", "init", "--runs-dir", tmp_path / "runs", "--data-dir",
              synthetic_data("iemocap"), "--device", "cpu", "--model", "mult", "--epochs", 1]
    assert _main(*common, "--init-from", copy) == 0
    copy.rename(tmp_path / "moved.pt")
    assert _main(*common, "--resume") == 0  # resuming reads last.pt only
    assert _main(*common, "--resume", "--init-from", tmp_path / "moved.pt") == 0  # the same content
    assert _main(*common, "--resume", "--init-from", fixtures_dir / "causal_hm_iemocap.pt") == 2  # another file


def test_an_uninitialised_position_placeholder_is_not_taken_for_a_weight(tmp_path):
    # The published encoders' `_float_tensor` is torch.FloatTensor(1): uninitialised memory, NaN at times.
    fake, reference = published_mult()
    fake.trans_l_mem.embed_positions._float_tensor.fill_(float("nan"))
    path = save_published(fake, tmp_path / "mult.pt")
    inputs = random_inputs()
    with torch.no_grad():
        assert torch.allclose(import_published(path, "iemocap")(*inputs)[0], reference(*inputs)[0], atol=1e-5, rtol=0)
