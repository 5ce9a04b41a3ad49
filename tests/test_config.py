"""Config resolution and validation: every mistake is a ConfigError naming the key."""
import pytest

from src.errors import ConfigError
from src.train.config import CONFIG_DIR, load_config, parse_override, read_yaml


def test_dataset_configs_resolve_with_every_backbone():
    for dataset in ("iemocap", "mosei_senti", "mosi"):
        for backbone in ("mult", "dmd", "pmr"):
            cfg = load_config(dataset, backbone=backbone)
            assert cfg["dataset"] == dataset
            assert cfg["model"]["backbone"] == backbone
            assert cfg["model"]["backbone_params"], f"{backbone} has no hyperparameters for {dataset}"


def test_iemocap_defaults_are_the_reference_settings():
    cfg = load_config("iemocap")
    assert cfg["loss"] == {"alpha": 0.1, "beta": 1.0, "kl": "all"}
    assert cfg["model"]["head"] == {"fusion": "mask", "constant": 0.0}
    train = cfg["train"]
    assert (train["batch_size"], train["epochs"], train["grad_clip_norm"]) == (32, 50, 0.8)
    assert train["lr"]["backbone"] == 2e-3 and train["lr"]["constant"] == 2e-3
    assert train["plateau"] == {"factor": 0.1, "patience": 20}
    params = cfg["model"]["backbone_params"]
    assert params["kernel_sizes"] == [3, 5, 3] and params["d_model"] == 40 and params["layers"] == 5


def test_backbone_train_overrides_are_merged():
    cfg = load_config("mosei_senti", backbone="dmd")
    assert cfg["train"]["lr"]["backbone"] == 1e-4
    assert cfg["train"]["grad_clip_value"] == 0.6
    assert cfg["train"]["accumulate"] == 10


def test_set_overrides_apply_last_and_parse_yaml_values():
    cfg = load_config("iemocap", overrides=["train.epochs=3", "model.head.fusion=sum",
                                            "model.backbone_params.layers=2", "train.early_stop=null"])
    assert cfg["train"]["epochs"] == 3
    assert cfg["model"]["head"]["fusion"] == "sum"
    assert cfg["model"]["backbone_params"]["layers"] == 2
    assert cfg["train"]["early_stop"] is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "unknown config key 'train.epoch'"),
    (["train.epochs=three"], "config key 'train.epochs' must be int"),
    (["train.epochs=0"], "train.epochs must be at least 1"),
    (["model.head.fusion=product"], "valid"),
    (["loss.kl=half"], "valid"),
    (["data.task=regression"], "data.task 'regression' is not valid for iemocap"),
    (["model.branches.text.kind=lstm"], "model.branches.text.kind 'lstm' is unknown"),
    (["train.plateau.factor=2"], "train.plateau.factor must be in (0, 1)"),
    (["train.lr.backbone=true"], "config key 'train.lr.backbone' must be"),
    (["model.backbone=bert"], "unknown backbone 'bert'"),
    (["nonsense"], "--set expects key=value"),
])
def test_bad_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("iemocap", overrides=override)
    assert message in str(err.value)


def test_fusion_error_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_config("iemocap", overrides=["model.head.fusion=product"])
    for name in ("mask", "sum", "hm", "tanh"):
        assert name in str(err.value)


def test_config_for_another_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is for dataset 'mosi', not 'iemocap'"):
        load_config("iemocap", config_path=CONFIG_DIR / "mosi.yaml")


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_an_earlier_run_config_with_nlevels_reads_as_layers_and_both_names_are_refused():
    from src.train.config import upgrade_run_config

    old = {"model": {"backbone": "dmd", "backbone_params": {"d_model": 8, "nlevels": 2}}}
    assert upgrade_run_config(old, "config.yaml")["model"]["backbone_params"] == {"d_model": 8, "layers": 2}
    current = {"model": {"backbone": "mult", "backbone_params": {"layers": 5}}}
    assert upgrade_run_config(current, "config.yaml") == {"model": {"backbone": "mult", "backbone_params": {"layers": 5}}}
    with pytest.raises(ConfigError, match="runs/x/config.yaml.*nlevels.*layers"):
        upgrade_run_config({"model": {"backbone_params": {"nlevels": 2, "layers": 2}}}, "runs/x/config.yaml")
