"""The reference text branch: GloVe vectors -> Linear -> ALBERT (as input embeddings) -> mean -> Linear.

Needs the optional HuggingFace `transformers` package (`pip install -e .[albert]`); it is imported
only when this branch is built, so the rest of the project runs without it.

Pretrained weights can't be downloaded here: pass `pretrained_path`, a local directory written by
`save_pretrained`, or a `config` dict for a randomly initialised model (default: base size with
128-dimensional embeddings, the shape the reference used).
"""
from torch import nn

from ..errors import ConfigError

# ALBERT-base, the size the reference used. Spelled out because AlbertConfig()'s own defaults are the
# xxlarge model (hidden size 4096) in the transformers releases this project installs.
ALBERT_BASE = dict(embedding_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072)


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ConfigError(
            "the 'albert' branch needs the optional HuggingFace transformers package: "
            "pip install -e .[albert]  (or choose another text branch kind: transformer, pool)"
        ) from error
    return transformers


class AlbertBranch(nn.Module):
    """(B, L, in_dim) -> Linear(in_dim -> embedding_size) -> AlbertModel(inputs_embeds) -> mean over
    tokens -> Linear(hidden_size -> output_dim).

    As in the reference, every token (padding included) is attended to and averaged.
    """

    def __init__(self, in_dim, seq_len=None, output_dim=1, pretrained_path=None, config=None):
        super().__init__()
        transformers = _import_transformers()
        if pretrained_path is not None:
            try:
                self.albert = transformers.AlbertModel.from_pretrained(str(pretrained_path), local_files_only=True)
            except OSError as error:
                raise ConfigError(f"can't load ALBERT weights from {pretrained_path}: {error}") from error
        else:
            options = {**ALBERT_BASE, **(config or {})}
            self.albert = transformers.AlbertModel(transformers.AlbertConfig(**options))
        albert_config = self.albert.config
        if seq_len is not None and seq_len > albert_config.max_position_embeddings:
            raise ConfigError(f"text length {seq_len} exceeds ALBERT's {albert_config.max_position_embeddings} positions")
        self.embed = nn.Linear(in_dim, albert_config.embedding_size)
        self.out = nn.Linear(albert_config.hidden_size, output_dim)

    def forward(self, x):
        hidden = self.albert(inputs_embeds=self.embed(x)).last_hidden_state  # (B, L, hidden)
        return self.out(hidden.mean(dim=1))
