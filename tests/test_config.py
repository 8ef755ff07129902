import pytest
import tomllib

from flopwise.config import RunConfig, config_to_toml, load_config
from flopwise.errors import FlopwiseError


def test_defaults_need_no_file():
    config = load_config()
    assert config.model.size == "small"
    assert config.data.sources == ["stdlib"]


def test_toml_file_then_values_then_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nd_model = 96\nn_heads = 3\n[budget]\nseconds = "3m"\n[optim]\nlr = 0.001\n')
    config = load_config(path, ["model.d_model=192", "budget.tokens=5e6", "data.sources=./texts"],
                         values={"optim.lr": 0.002})
    assert config.model.d_model == 192 and config.model.n_heads == 3
    assert config.budget.seconds == 180.0 and config.budget.tokens == 5e6
    assert config.optim.lr == 0.002
    assert config.data.sources == ["./texts"]


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  size: tiny\nbudget:\n  steps: 40\n")
    config = load_config(path)
    assert config.model.size == "tiny" and config.budget.steps == 40


def test_unknown_key_is_one_line_naming_it(tmp_path):
    with pytest.raises(FlopwiseError) as err:
        load_config(None, ["model.d_modle=256"])
    message = str(err.value)
    assert "\n" not in message
    assert "unknown key 'model.d_modle'" in message and "d_model" in message
    path = tmp_path / "bad.toml"
    path.write_text("[trian]\nseed = 1\n")
    with pytest.raises(FlopwiseError, match=r"bad.toml.*unknown key 'trian'"):
        load_config(path)


def test_bad_values_name_field_and_value():
    with pytest.raises(FlopwiseError, match=r"optim.lr=.*-1.*must be positive"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(FlopwiseError, match=r"model.size='huge'.*choose one of"):
        load_config(None, ["model.size=huge"])
    with pytest.raises(FlopwiseError, match=r"budget.seconds='5M'.*tokens amount"):
        load_config(None, ["budget.seconds=5M"])
    with pytest.raises(FlopwiseError, match="must look like section.key=value"):
        load_config(None, ["model.d_model"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FlopwiseError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(FlopwiseError, match="broken.toml' is not valid TOML"):
        load_config(broken)


def test_toml_round_trip():
    config = load_config(None, ["model.d_model=192", "budget.seconds=90", "data.include=['*.md', '*.txt']",
                                "model.qk_norm=true"])
    text = config_to_toml(config)
    again = RunConfig.model_validate(tomllib.loads(text))
    assert again == config


def test_model_shape_errors_are_clear_and_come_at_validation():
    with pytest.raises(FlopwiseError, match="n_heads=3 does not divide model.d_model=100"):
        load_config(None, ["model.d_model=100", "model.n_heads=3"])


def test_cross_field_errors_come_before_any_data_is_read(tmp_path, capsys):
    """A shape error and a method's own rule are reported for a data source that does not exist: nothing
    was read before the config was refused."""
    missing = str(tmp_path / "no-such-corpus")
    from flopwise.cli import main

    assert main(["train", "--data", missing, "--budget", "5steps", "--out", str(tmp_path / "a"),
                 "--set", "model.d_model=100", "--set", "model.n_heads=3"]) == 2
    assert "n_heads=3 does not divide" in capsys.readouterr().err
    assert main(["train", "--data", missing, "--budget", "5steps", "--out", str(tmp_path / "b"),
                 "--method", "layerwise", "--set", "optim.grad_accum=2"]) == 2
    assert "'layerwise'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_memory_and_methods_sections_units_methods_and_errors():
    config = load_config(None, ["memory.limit=4GiB", "methods.use=galore", "optim.name=adamw"])
    assert config.memory.limit == 4 * 2**30 and config.methods.use == ["galore"]
    assert load_config(None, [], {"methods.use": ["checkpointing", "8bit"]}).methods.use == ["8bit",
                                                                                           "checkpointing"]
    with pytest.raises(FlopwiseError, match="methods.use=.*unknown method 'zip': choose from 8bit, bf16_weights, checkpointing"):
        load_config(None, ["methods.use=[zip]"])
    with pytest.raises(FlopwiseError, match="methods.sltrain.delta=1.5: must lie in"):
        load_config(None, ["methods.sltrain.delta=1.5"])
    with pytest.raises(FlopwiseError, match="'memory.galore_rank' is now 'methods.galore.rank': rename it"):
        load_config(None, ["memory.galore_rank=8"])
    with pytest.raises(FlopwiseError, match="section 'reweight' moved under .methods.*'reweight.strategy' is now"):
        load_config(None, ["reweight.strategy=quadratic"])
    with pytest.raises(FlopwiseError, match="memory.limit=.lots.: memory size .lots. is not understood: use e.g. 8GiB"):
        load_config(None, ["memory.limit=lots"])
    assert "limit = 4294967296.0" in config_to_toml(config)
