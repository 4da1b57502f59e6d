import pytest
import yaml

from kernel.bundled_configs import BUNDLED_CONFIGS
from kernel.config import Config, ConfigError, all_keys, config_from_dict, config_to_yaml, load_config
from kernel.values import interval_seconds, parse_duration


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'; did you mean 'train.lr'\?"):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'; did you mean 'train'\?"):
        load_config(None, {"trian.lr": 0.1})


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "mine.yaml", "model:\n  n_layers: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "'model.n_layer'" in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("model.n_layer=four", "expected an integer"),
    ("model.n_layer=2.5", "expected an integer"),
    ("train.compile=1", "expected true, false or auto"),
    ("train.compile=sometimes", "expected true, false or auto"),
    ("train.lr=fast", "expected a number"),
    ("data.text_glob=[1, 2]", "expected a string"),
])
def test_wrong_types_are_rejected_with_the_key(override, expected):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}': {expected}"):
        load_config(None, [override])


def test_impossible_values_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"model.n_embd": 100, "model.n_head": 6, "train.lr": -1.0, "model.dropout": 1.5})
    message = str(err.value)
    assert "'model.n_embd' (100) must be divisible by 'model.n_head' (6)" in message
    assert "'train.lr' must be > 0" in message and "'model.dropout' must be in [0, 1)" in message


def test_a_choice_suggests_the_valid_spelling():
    with pytest.raises(ConfigError, match=r"'train.dtype' must be one of .* got 'bf16'"):
        load_config(None, ["train.dtype=bf16"])
    with pytest.raises(ConfigError, match=r"did you mean 'float16'"):
        load_config(None, ["train.dtype=flaot16"])


def test_layers_apply_in_order_defaults_extends_file_overrides(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.01\n  max_steps: 10\nmodel:\n  n_layer: 3\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  lr: 0.02\n")
    config = load_config(str(child), ["train.lr=0.03"])
    assert config.train.lr == 0.03            # --set beats the file
    assert config.train.max_steps == 10       # the base file beats the defaults
    assert config.model.n_layer == 3
    assert config.train.warmup_steps == Config().train.warmup_steps  # untouched: the default
    assert load_config(str(child)).train.lr == 0.02  # the file beats what it extends


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))


def test_missing_config_suggests_a_bundled_one():
    with pytest.raises(ConfigError, match=r"'llm_cpu.yml' not found.*did you mean 'llm_cpu.yaml'"):
        load_config("llm_cpu.yml")


def test_bundled_presets_load_and_the_t4_preset_extends_the_base():
    assert {"llm_base.yaml", "llm_kaggle_t4.yaml", "llm_cpu.yaml"} <= set(BUNDLED_CONFIGS)
    base, t4, cpu = (load_config(name) for name in ("llm_base.yaml", "llm_kaggle_t4.yaml", "llm_cpu.yaml"))
    assert t4.model.n_layer == base.model.n_layer and t4.train.batch_size != base.train.batch_size
    assert t4.train.time_budget == 8 * 3600 and t4.train.checkpoint_interval == "20m"
    assert cpu.data.text_glob == "" and cpu.model.n_embd < base.model.n_embd


@pytest.mark.parametrize("text, seconds", [(64, 64.0), ("64", 64.0), ("90s", 90.0), ("45m", 2700.0),
                                           ("8h30m", 30600.0), ("1h", 3600.0), (None, None), (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "5x", "-3", 0, True, "h"])
def test_bad_durations_are_rejected(bad):
    with pytest.raises(ConfigError, match="train.time_budget"):
        load_config(None, {"train.time_budget": bad})


@pytest.mark.parametrize("given, kept, seconds", [(0, 0, None), (500, 500, None), ("500", 500, None),
                                                  ("20m", "20m", 1200.0), ("90s", "90s", 90.0), ("1h", "1h", 3600.0)])
def test_checkpoint_interval_takes_steps_or_a_duration(given, kept, seconds):
    config = load_config(None, {"train.checkpoint_interval": given})
    interval = config.train.checkpoint_interval
    assert interval == kept and interval_seconds(interval) == seconds
    assert config_from_dict(yaml.safe_load(config_to_yaml(config)), "config.yaml") == config  # saved as given


@pytest.mark.parametrize("bad", [-1, "soon", 1.5, True, "0s"])
def test_bad_checkpoint_intervals_are_rejected(bad):
    with pytest.raises(ConfigError, match="train.checkpoint_interval.*number of steps"):
        load_config(None, {"train.checkpoint_interval": bad})


def test_yaml_reads_3e_4_as_text_but_we_take_it_as_a_number(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 3e-4\n  min_lr: 1e-5\n")
    assert load_config(str(path)).train.lr == pytest.approx(3e-4)


def test_glob_values_survive_the_command_line():
    assert load_config(None, ["data.text_glob=**/*.txt"]).data.text_glob == "**/*.txt"


def test_resolved_config_round_trips_through_yaml():
    config = load_config("llm_kaggle_t4.yaml", ["train.lr=3e-4", "sample.prompts=['a', 'b']"])
    assert config_from_dict(yaml.safe_load(config_to_yaml(config)), "saved") == config


def test_every_key_is_documented_in_the_readme():
    readme = open("README.md", encoding="utf-8").read()
    missing = [key for key in all_keys() if f"`{key}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"


def test_a_misspelled_synonym_is_pointed_at_the_key_it_means_and_nonsense_gets_the_list():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lernin_rate'; did you mean 'train.lr'\?"):
        load_config(None, {"train.lernin_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"'train.num_train_epoch'; did you mean 'train.max_steps'\? \(it counts"):
        load_config(None, {"train.num_train_epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'train.zzzzzz'; valid: data.cache_dir"):
        load_config(None, {"train.zzzzzz": 3})


def test_a_users_own_choice_turns_off_the_presets_setting_that_depends_on_it(capsys):
    """The presets' model.size=auto (GPU) and QK-norm (CPU) give way to a shape or an architecture the user sets;
    set together by the user they are what the user asked for (or an error that says why)."""
    shaped = load_config("llm_kaggle_t4.yaml", {"model.n_layer": 8})
    assert (shaped.model.size, shaped.model.n_layer) == ("", 8)
    assert "model.n_layer given: the preset's model.size=auto is not used" in capsys.readouterr().out
    assert load_config("llm_kaggle_t4.yaml", {"model.n_layer": 8, "model.size": "auto"}).model.size == "auto"
    assert load_config("llm_cpu.yaml").model.qk_norm and not load_config("llm_cpu.yaml", {"model.arch": "gpt2"}).model.qk_norm
    with pytest.raises(ConfigError, match="'model.qk_norm' needs model.arch=llama"):
        load_config("llm_cpu.yaml", {"model.arch": "gpt2", "model.qk_norm": True})
