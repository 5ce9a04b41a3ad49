"""Unimodal branches: shapes, one training step, padding handling, the optional ALBERT branch."""
import sys

import pytest
import torch

from src.errors import ConfigError
from src.models import build_branch

TINY_ALBERT = {"config": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              vocab_size=16, max_position_embeddings=64)}
LIGHT_KINDS = {"pool": {}, "transformer": {}, "resnet18": {"width": 8}}


@pytest.mark.parametrize("kind,options", list(LIGHT_KINDS.items()))
@pytest.mark.parametrize("length,dim,classes", [(20, 300, 8), (12, 5, 1), (7, 35, 7)])
def test_shapes(kind, options, length, dim, classes):
    branch = build_branch(kind, in_dim=dim, seq_len=length, output_dim=classes, **options).eval()
    assert branch(torch.randn(3, length, dim)).shape == (3, classes)


def test_resnet18_has_the_standard_layout():
    branch = build_branch("resnet18", in_dim=35, seq_len=20, output_dim=8)
    convs = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2) and convs[0].in_channels == 1
    assert len(branch.stages) == 8 and branch.fc.in_features == 512
    # 16 block convolutions + 3 projection shortcuts + the stem = the 20 of ResNet-18
    assert len(convs) == 20


def train_one_step(branch, x, target):
    optimizer = torch.optim.Adam(branch.parameters(), lr=1e-2)
    branch.train()
    loss = torch.nn.functional.cross_entropy(branch(x), target)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in branch.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    optimizer.step()
    branch.eval()
    with torch.no_grad():
        before, after = loss.item(), torch.nn.functional.cross_entropy(branch(x), target).item()
    return before, after


@pytest.mark.parametrize("kind,options", list(LIGHT_KINDS.items()))
def test_one_training_step_reduces_the_loss(kind, options):
    torch.manual_seed(0)
    branch = build_branch(kind, in_dim=10, seq_len=6, output_dim=3, **options)
    x, target = torch.randn(8, 6, 10), torch.randint(0, 3, (8,))
    branch.eval()
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(branch(x), target).item()
    _, after = train_one_step(branch, x, target)
    assert after < start


def test_pool_ignores_left_padding():
    torch.manual_seed(0)
    branch = build_branch("pool", in_dim=6, seq_len=5, output_dim=2).eval()
    x = torch.randn(3, 5, 6)
    padded = torch.cat([torch.zeros(3, 4, 6), x], dim=1)
    assert torch.allclose(branch(x), branch(padded), atol=1e-6)


def test_transformer_mean_pooling_ignores_padded_steps_in_the_average():
    torch.manual_seed(0)
    branch = build_branch("transformer", in_dim=6, seq_len=5, output_dim=2, pooling="mean").eval()
    x = torch.zeros(2, 5, 6)
    x[:, 3:] = torch.randn(2, 2, 6)
    hidden = branch.encoder(branch.proj(x).transpose(0, 1)).transpose(0, 1)
    expected = branch.out(hidden[:, 3:].mean(dim=1))
    assert torch.allclose(branch(x), expected, atol=1e-6)


def test_transformer_last_step_pooling_and_bad_option():
    branch = build_branch("transformer", in_dim=4, seq_len=3, output_dim=2, pooling="last", layers=2)
    assert branch(torch.randn(2, 3, 4)).shape == (2, 2)
    with pytest.raises(ValueError):
        build_branch("transformer", in_dim=4, seq_len=3, output_dim=2, pooling="max")


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown branch kind"):
        build_branch("lstm", in_dim=4, seq_len=3, output_dim=2)


def test_albert_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"pip install -e \.\[albert\]"):
        build_branch("albert", in_dim=300, seq_len=20, output_dim=8)


def test_albert_tiny_random_config_trains_one_step():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    branch = build_branch("albert", in_dim=12, seq_len=6, output_dim=4, **TINY_ALBERT)
    x, target = torch.randn(4, 6, 12), torch.randint(0, 4, (4,))
    assert branch(x).shape == (4, 4)
    train_one_step(branch, x, target)


def test_albert_loads_a_local_pretrained_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    source = transformers.AlbertModel(transformers.AlbertConfig(embedding_size=16, **TINY_ALBERT["config"]))
    source.save_pretrained(tmp_path)
    branch = build_branch("albert", in_dim=12, seq_len=6, output_dim=2, pretrained_path=tmp_path)
    assert torch.equal(branch.albert.embeddings.position_embeddings.weight,
                       source.embeddings.position_embeddings.weight)
    with pytest.raises(ConfigError, match="can't load ALBERT"):
        build_branch("albert", in_dim=12, seq_len=6, output_dim=2, pretrained_path=tmp_path / "missing")


def test_albert_default_is_the_base_size():
    pytest.importorskip("transformers")
    branch = build_branch("albert", in_dim=300, seq_len=20, output_dim=8)
    config = branch.albert.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.embedding_size) == \
        (768, 12, 12, 128)
    assert branch.embed.out_features == 128 and branch.out.in_features == 768
