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
    assert cfg["loss"] == {"alpha": 0.1, "beta": 1.0, "kl": "all", "unimodal_labels": False}
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


# ------------------------------------------------------------------------------------ the one schema
def test_the_readme_configuration_reference_is_the_generated_one():
    from src.run.config import markdown_reference

    readme = (CONFIG_DIR.parent / "README.md").read_text()
    start = readme.index("<!-- configuration reference: generated")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- end of the configuration reference -->")
    assert readme[start:end] == markdown_reference()


def test_every_key_of_the_dataset_configs_is_in_the_schema_with_a_meaning():
    import yaml

    from src.run.config import BY_KEY, OPTION_SECTIONS

    def leaves(node, prefix=""):
        for key, value in node.items():
            here = f"{prefix}{key}"
            if isinstance(value, dict) and here not in OPTION_SECTIONS:
                yield from leaves(value, here + ".")
            else:
                yield here

    for dataset in ("iemocap", "mosei_senti", "mosi"):
        for key in leaves(yaml.safe_load((CONFIG_DIR / f"{dataset}.yaml").read_text())):
            assert key in BY_KEY and BY_KEY[key].meaning, key


def test_defaults_come_from_the_schema_for_keys_a_config_leaves_out(tmp_path):
    text = (CONFIG_DIR / "iemocap.yaml").read_text()
    kept = [line for line in text.splitlines() if not line.strip().startswith(
        ("weight_decay", "grad_clip_value", "accumulate", "accumulation", "early_stop", "logger", "compile"))]
    (tmp_path / "c.yaml").write_text("\n".join(kept) + "\n")
    train = load_config("iemocap", config_path=tmp_path / "c.yaml")["train"]
    assert (train["weight_decay"], train["grad_clip_value"], train["accumulate"], train["accumulation"],
            train["early_stop"], train["logger"], train["compile"]) == (0.0, None, 1, "corrected", None, "none", False)


def test_a_run_config_written_before_a_key_existed_reads_with_its_default(tmp_path):
    from src.run.checkpoint import read_config_file
    from src.run.config import dump_config

    cfg = load_config("iemocap")
    del cfg["train"]["accumulation"], cfg["train"]["logger"]
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    saved = read_config_file(tmp_path / "config.yaml")
    assert saved == load_config("iemocap")


@pytest.mark.parametrize("override, key", [
    ("model.backbone_params.attn_dropout=1.5", "model.backbone_params.attn_dropout"),
    ("model.backbone_params.relu_dropout=-0.5", "model.backbone_params.relu_dropout"),
    ("model.backbone_params.attn_dropout_a=1", "model.backbone_params.attn_dropout_a"),
    ("model.backbone_params.out_dropout=1.0", "model.backbone_params.out_dropout"),
    ("model.branches.text={kind: pool, dropout: 2}", "model.branches.text.dropout"),
])
def test_dropouts_are_probabilities_below_1(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("iemocap", overrides=[override])
    assert f"{key} must be in [0, 1)" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.backbone_params.d_model=-10", "model.backbone_params.d_model must be at least 1"),
    ("model.backbone_params.d_model=0", "model.backbone_params.d_model must be at least 1"),
    ("model.backbone_params.layers=0", "model.backbone_params.layers must be at least 1"),
    ("model.backbone_params.num_heads=0", "model.backbone_params.num_heads must be at least 1"),
    ("model.backbone_params.kernel_sizes=[0, 3, 3]", "model.backbone_params.kernel_sizes must be at least 1"),
    ("model.backbone_params.kernel_sizes=[3, 3]", "'model.backbone_params.kernel_sizes' must be a list of 3 int"),
    ("model.backbone_params.d_model=1.5", "'model.backbone_params.d_model' must be int"),
    ("model.branches.text={kind: transformer, layers: 0}", "model.branches.text.layers must be at least 1"),
    ("model.branches.audio={kind: pool, hidden: 0}", "model.branches.audio.hidden must be at least 1"),
    ("model.backbone_params.d_model=7", "model.backbone_params.d_model (7) must be a multiple of "
                                        "model.backbone_params.num_heads (10)"),
    ("model.backbone_params.attn_mask=yes", "'model.backbone_params.attn_mask' must be bool"),
    ("model.backbone_params.engine=turbo", "model.backbone_params.engine 'turbo' is unknown"),
    ("model.backbone_params.output_dim=3", "model.backbone_params.output_dim comes from the data"),
])
def test_backbone_and_branch_options_have_ranges(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("iemocap", overrides=[override])
    assert message in str(err.value)


def test_a_kernel_longer_than_the_sequences_is_refused_when_the_model_is_built():
    from src.run.build import build_model

    cfg = load_config("iemocap", backbone="mult", overrides=["model.backbone_params.kernel_sizes=[30, 3, 3]"])
    with pytest.raises(ConfigError, match=r"model.backbone_params.kernel_sizes: the text kernel size 30 is longer "
                                          r"than the text sequences of the data \(20 steps\)"):
        build_model(cfg, (300, 74, 35), (20, 20, 20), 8)


def test_set_cannot_contradict_the_command_line():
    with pytest.raises(ConfigError) as err:
        load_config("mosei_senti", overrides=["dataset=mosi"])
    assert "--set dataset=mosi contradicts --dataset, which gives dataset = mosei_senti" in str(err.value)
    with pytest.raises(ConfigError, match="--set train.epochs=3 contradicts a command-line flag"):
        load_config("iemocap", overrides=["train.epochs=3"], cli={"train.epochs": 5})
    with pytest.raises(ConfigError, match="--set model.backbone=dmd contradicts"):
        load_config("iemocap", backbone="mult", overrides=["model.backbone=dmd"])
    # the same value twice is no contradiction, and a flag left out fixes nothing
    assert load_config("iemocap", overrides=["dataset=iemocap", "train.epochs=3"],
                       cli={"train.epochs": None})["train"]["epochs"] == 3


def test_a_text_key_set_to_a_number_keeps_the_text():
    assert load_config("iemocap", overrides=["data.dir=2024"])["data"]["dir"] == "2024"


# --------------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("text, value", [("010", 10), ("0o10", 8), ("0x10", 16), ("1:00", "1:00"), ("yes", "yes"),
                                         ("on", "on"), ("No", "No"), ("2001-12-14", "2001-12-14"), ("1_000", "1_000"),
                                         ("true", True), ("~", None), ("-.inf", float("-inf"))])
def test_config_yaml_is_read_as_yaml_1_2(text, value):
    from src.run.yamlfile import load_yaml

    assert load_yaml(f"k: {text}") == {"k": value}
    assert type(load_yaml(f"k: {text}")["k"]) is type(value)


def test_yaml_1_1_forms_are_refused_where_a_number_or_boolean_is_needed(tmp_path):
    text = (CONFIG_DIR / "iemocap.yaml").read_text()
    for old, new, message in (("epochs: 50", "epochs: 1:00", "'train.epochs' must be int, got '1:00'"),
                              ("aligned: true", "aligned: yes", "'data.aligned' must be bool, got 'yes'")):
        (tmp_path / "c.yaml").write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=message):
            load_config("iemocap", config_path=tmp_path / "c.yaml")


def test_written_configs_read_back_the_same_under_yaml_1_1_and_1_2():
    import yaml

    from src.run.config import dump_config
    from src.run.yamlfile import load_yaml

    cfg = {"names": ["yes", "0o10", "1e3", "010", "1:00", "~", "on", "2001-12-14"]}
    text = dump_config(cfg)
    assert load_yaml(text) == cfg and yaml.safe_load(text) == cfg


def test_a_key_given_twice_is_refused(tmp_path):
    text = (CONFIG_DIR / "iemocap.yaml").read_text().replace("  epochs: 50\n", "  epochs: 50\n  epochs: 5\n")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: the key 'epochs' is given twice \(line"):
        load_config("iemocap", config_path=tmp_path / "c.yaml")


def billion_laughs(levels=9) -> str:
    lines = ['    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    text = (CONFIG_DIR / "iemocap.yaml").read_text().replace(
        "model:\n", "model:\n  backbone_params:\n" + billion_laughs(), 1)
    assert len(text.encode()) < 4000
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="c.yaml is not valid YAML: its aliases expand to more than 100000 values"):
        load_config("iemocap", config_path=tmp_path / "c.yaml")


def test_an_alias_inside_itself_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("model: &m {backbone_params: *m}\n")
    with pytest.raises(ConfigError, match="an alias refers to the value that contains it"):
        read_yaml(tmp_path / "c.yaml")


def test_a_binary_config_file_is_refused_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"dataset: iemocap\n\xff\xfe\x00\x89PNG")
    with pytest.raises(ConfigError, match=r"c.yaml is not a UTF-8 text file"):
        read_yaml(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------------- run identity
def test_the_engine_is_part_of_what_a_run_trains_but_not_of_its_weights(tmp_path):
    from src.errors import CheckpointError
    from src.run.checkpoint import check_same_config
    from src.run.config import model_signature

    fast = load_config("iemocap", overrides=["model.backbone_params.engine=fast"])
    plain = load_config("iemocap", overrides=["model.backbone_params.engine=plain", "train.compile=true",
                                              "train.logger=tensorboard"])
    assert model_signature(fast) == model_signature(plain)  # any engine evaluates the weights
    with pytest.raises(CheckpointError, match="model.backbone_params.engine = 'fast'.*'plain'"):
        check_same_config(fast, plain, tmp_path / "config.yaml")
    del plain["model"]["backbone_params"]["engine"], fast["model"]["backbone_params"]["engine"]
    check_same_config(fast, plain, tmp_path / "config.yaml")  # compile and the logger change nothing


def test_a_width_the_constructor_refuses_is_named_by_its_section():
    from src.run.build import build_model

    cfg = load_config("iemocap", overrides=["model.branches.text={kind: transformer, d_model: 30}"])  # 4 heads
    with pytest.raises(ConfigError, match=r"model.branches.text: an attention width of 30 is not a multiple of its "
                                          r"4 heads"):
        build_model(cfg, (300, 74, 35), (20, 20, 20), 8)
