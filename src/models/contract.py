"""The backbone contract as the wrappers (CausalMER, BackboneOnly) consume it.

A backbone's forward(text, audio, vision) returns one of
    logits                  (B, C)
    (logits, hidden)        hidden a tensor (e.g. MulT's last_hs): not needed for training, dropped
    (logits, extras)        extras a dict that only the backbone's own aux_loss reads
and it may define aux_loss(extras, target) -> scalar tensor; absent means no auxiliary loss.

The validation loss (what ReduceLROnPlateau, the best-loss checkpoint and early stopping follow) is the
wrapper's own loss plus the backbone's auxiliary loss, unless the backbone declares
`validation_uses_aux_loss = False`: then its auxiliary terms train it but do not judge it (DMD, whose
reference selects on the fused output's task loss alone).
"""
import torch


def split_backbone_output(result) -> tuple[torch.Tensor, dict]:
    """Normalise a backbone's return value to (logits, extras)."""
    if isinstance(result, torch.Tensor):
        return result, {}
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.Tensor):
        logits, second = result
        if isinstance(second, dict):
            return logits, second
        if isinstance(second, torch.Tensor):
            return logits, {}
    raise TypeError(
        "a backbone must return logits, (logits, hidden tensor) or (logits, extras dict); "
        f"got {type(result).__name__}"
        + (f" of {[type(item).__name__ for item in result]}" if isinstance(result, (tuple, list)) else "")
    )


def backbone_aux_loss(backbone, extras: dict, target: torch.Tensor) -> torch.Tensor | None:
    """The backbone's auxiliary loss on its extras, or None when it defines none."""
    aux_loss = getattr(backbone, "aux_loss", None)
    if aux_loss is None:
        return None
    return aux_loss(extras, target)


def with_aux_term(terms: dict, backbone, extras: dict, target: torch.Tensor, validation: bool = False) -> dict:
    """A wrapper's own loss parts plus the backbone's auxiliary loss as `aux`, where there is one and (for
    the validation loss, `validation=True`) where the backbone counts it there."""
    aux = (backbone_validation_aux_loss if validation else backbone_aux_loss)(backbone, extras, target)
    return terms if aux is None else {**terms, "aux": aux}


def backbone_validation_aux_loss(backbone, extras: dict, target: torch.Tensor) -> torch.Tensor | None:
    """The backbone's auxiliary loss as its validation loss counts it: None when it has none or declares
    `validation_uses_aux_loss = False`."""
    if not getattr(backbone, "validation_uses_aux_loss", True):
        return None
    return backbone_aux_loss(backbone, extras, target)
