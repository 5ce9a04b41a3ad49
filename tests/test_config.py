"""Config resolution and validation: every mistake is a ConfigError naming the key."""
import pytest

from src.errors import ConfigError
from src.run.config import CONFIG_DIR, load_config, parse_override, read_yaml


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


@pytest.mark.parametrize("override, message", [
    (["train.weight_decay=-0.1"], "train.weight_decay must be non-negative"),
    (["train.early_stop=0"], "train.early_stop must be at least 1"),
    (["train.early_stop=-2"], "train.early_stop must be at least 1"),
    (["train.plateau.patience=-1"], "train.plateau.patience must be non-negative"),
    (["loss.alpha=-0.1"], "loss.alpha must be non-negative"),
    (["loss.beta=-1"], "loss.beta must be non-negative"),
    (["model.backbone=[1]"], "model.backbone' must be a backbone name"),
    (["model.backbone={a: 1}"], "model.backbone' must be a backbone name"),
])
def test_values_the_run_would_misuse_later_are_refused_now(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("iemocap", overrides=override)
    assert message in str(err.value)


def test_the_edges_of_those_ranges_are_accepted():
    cfg = load_config("iemocap", overrides=["train.weight_decay=0", "train.early_stop=1", "train.plateau.patience=0",
                                            "loss.alpha=0", "loss.beta=0"])
    assert cfg["train"]["early_stop"] == 1 and cfg["train"]["plateau"]["patience"] == 0


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5E+2", 500.0), ("-2e-4", -0.0002), ("1.0e-3", 0.001),
                                         (".5e1", 5.0), ("12", 12), ("1e", "1e"), ("e5", "e5")])
def test_exponent_numbers_are_floats_as_in_yaml_1_2(text, value):
    _, parsed = parse_override(f"train.lr.backbone={text}")
    assert parsed == value and type(parsed) is type(value)


def test_exponent_numbers_in_overrides_and_config_files(tmp_path):
    cfg = load_config("iemocap", overrides=["train.lr.backbone=1e-3", "train.weight_decay=5E-4"])
    assert cfg["train"]["lr"]["backbone"] == 0.001 and cfg["train"]["weight_decay"] == 0.0005
    text = (CONFIG_DIR / "iemocap.yaml").read_text().replace("backbone: 2.0e-3", "backbone: 3e-4")
    assert "backbone: 3e-4" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config("iemocap", config_path=tmp_path / "c.yaml")["train"]["lr"]["backbone"] == 0.0003


@pytest.mark.parametrize("section, missing", [("loss", "loss.alpha"), ("train.plateau", "train.plateau.factor"),
                                              ("model.head", "model.head.fusion")])
def test_a_config_file_lacking_a_section_is_refused_naming_it(tmp_path, section, missing):
    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / "iemocap.yaml").read_text())
    *parents, last = section.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    del node[last]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=f"missing required key '{missing}'"):
        load_config("iemocap", config_path=tmp_path / "c.yaml")


def test_a_section_that_is_not_a_mapping_is_refused(tmp_path):
    text = (CONFIG_DIR / "iemocap.yaml").read_text()
    (tmp_path / "c.yaml").write_text(text[:text.index("train:")] + "train: 5\n")
    with pytest.raises(ConfigError, match="'train' must be a section"):
        load_config("iemocap", config_path=tmp_path / "c.yaml")


def test_retired_num_workers_key_is_dropped_from_old_configs(tmp_path, caplog):
    text = (CONFIG_DIR / "iemocap.yaml").read_text() + "  num_workers: 4\n"
    (tmp_path / "old.yaml").write_text(text)
    cfg = load_config("iemocap", config_path=tmp_path / "old.yaml")
    assert "num_workers" not in cfg["train"]
    assert "train.num_workers is ignored" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'train.num_workers'"):
        load_config("iemocap", overrides=["train.num_workers=2"])  # it does nothing: not a key any more
def test_an_earlier_run_config_with_nlevels_reads_as_layers_and_both_names_are_refused():
    from src.run.config import upgrade_config

    old = {"model": {"backbone": "dmd", "backbone_params": {"d_model": 8, "nlevels": 2}}}
    assert upgrade_config(old, "config.yaml")["model"]["backbone_params"] == {"d_model": 8, "layers": 2}
    current = {"model": {"backbone": "mult", "backbone_params": {"layers": 5}}}
    assert upgrade_config(current, "config.yaml") == {"model": {"backbone": "mult", "backbone_params": {"layers": 5}}}
    with pytest.raises(ConfigError, match="runs/x/config.yaml.*nlevels.*layers"):
        upgrade_config({"model": {"backbone_params": {"nlevels": 2, "layers": 2}}}, "runs/x/config.yaml")
