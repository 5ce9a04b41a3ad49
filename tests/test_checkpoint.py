"""Checkpoints: a flipped byte, an empty file or a crafted dict is a CheckpointError naming the file."""
import zipfile

import pytest
import torch
import yaml

from src.errors import CheckpointError
from src.run import checkpoint as ckpt_io

CONFIG = yaml.safe_dump({"dataset": "iemocap", "data": {"aligned": True, "task": "binary"}, "model": {"name": "x"}})


def _weights():
    return {"model": {"layer.weight": torch.arange(4096, dtype=torch.float32)}, "config": CONFIG, "epoch": 3}


def _resumable():
    return {**_weights(), "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "rng": ckpt_io.rng_state(),
            "state": {"epoch": 3, "best_loss": 0.5, "best_score": 0.7, "since_best": 0, "history": []}}


def test_a_good_checkpoint_loads(tmp_path):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_save(_resumable(), path)
    loaded = ckpt_io.load_checkpoint(path, resumable=True)
    assert torch.equal(loaded["model"]["layer.weight"], torch.arange(4096, dtype=torch.float32))


def test_one_flipped_byte_in_the_weights_is_refused(tmp_path):
    path = tmp_path / "best_acc.pt"
    ckpt_io.atomic_save(_weights(), path)
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.file_size == 4096 * 4)
        # The member's data starts after its local header (30 bytes + name + extra field).
        with open(path, "rb") as handle:
            handle.seek(member.header_offset + 26)
            name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
        start = member.header_offset + 30 + name_len + extra_len
    raw = bytearray(path.read_bytes())
    raw[start + 1000] ^= 0x40
    path.write_bytes(bytes(raw))
    # torch itself would load it as a silently different tensor; the CRC check refuses it.
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["layer.weight"],
                           torch.arange(4096, dtype=torch.float32))
    with pytest.raises(CheckpointError, match="checksum") as error:
        ckpt_io.load_checkpoint(path)
    assert str(path) in str(error.value)


def test_a_published_whole_model_file_points_at_import_checkpoint(fixtures_dir):
    path = fixtures_dir / "published_mult_init_iemocap.pt"
    with pytest.raises(CheckpointError) as error:
        ckpt_io.load_checkpoint(path)
    message = str(error.value)
    assert "whole-model file" in message and f"import-checkpoint {path}" in message
    assert "\x1b" not in message and "Weights only load failed" not in message and "\n" not in message


@pytest.mark.parametrize("content, fragment", [(b"", "empty"), (b"not a zip at all", "not a readable zip")])
def test_empty_or_foreign_file(tmp_path, content, fragment):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment) as error:
        ckpt_io.load_checkpoint(path)
    assert str(path) in str(error.value)


CRAFTED = {
    "not a dict": (lambda c: [c], False, "holds a list"),
    "model not a dict": (lambda c: {**c, "model": [1, 2]}, False, "'model' is of type list"),
    "model holds a non-tensor": (lambda c: {**c, "model": {"w": "x"}}, False, "not a named tensor"),
    "config not a string": (lambda c: {**c, "config": {"a": 1}}, False, "'config' is of type dict"),
    "config a YAML list": (lambda c: {**c, "config": "- 1\n- 2\n"}, False, "not a mapping"),
    "config not YAML": (lambda c: {**c, "config": "a: [1"}, False, "not valid YAML"),
    "epoch missing": (lambda c: {k: v for k, v in c.items() if k != "epoch"}, False, "'epoch' is missing"),
    "epoch a bool": (lambda c: {**c, "epoch": True}, False, "'epoch' is of type bool"),
    "optimizer missing": (lambda c: {k: v for k, v in c.items() if k != "optimizer"}, True, "'optimizer' is missing"),
    "state epoch a string": (lambda c: {**c, "state": {**c["state"], "epoch": "3"}}, True, "state.'epoch' is of type str"),
    "rng torch a list": (lambda c: {**c, "rng": {**c["rng"], "torch": [1, 2]}}, True, "rng.'torch' is of type list"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_dicts_are_refused_naming_the_part(tmp_path, case):
    craft, resumable, fragment = CRAFTED[case]
    path = tmp_path / "last.pt"
    torch.save(craft(_resumable()), path)
    with pytest.raises(CheckpointError) as error:
        ckpt_io.load_checkpoint(path, resumable=resumable)
    assert str(path) in str(error.value) and fragment in str(error.value), str(error.value)


def test_scheduler_and_rng_states_of_the_wrong_kind(tmp_path):
    model = torch.nn.Linear(2, 2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.Adam(model.parameters()))
    with pytest.raises(CheckpointError, match="scheduler state holds patience"):
        ckpt_io.load_scheduler_state(scheduler, {"patience": "ten"}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="scheduler state holds nonsense"):
        ckpt_io.load_scheduler_state(scheduler, {"nonsense": 1}, tmp_path / "last.pt")
    ckpt_io.load_scheduler_state(scheduler, scheduler.state_dict(), tmp_path / "last.pt")
    bad_rng = {**ckpt_io.rng_state(), "torch": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="random-number-generator"):
        ckpt_io.restore_rng_state(bad_rng, tmp_path / "last.pt")
