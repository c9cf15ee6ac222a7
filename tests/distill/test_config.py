"""The config tree: loading, overrides, validation errors that name the key, redaction."""

from pathlib import Path

import pytest
import yaml

from distill.config import ConfigError, DistillConfig, iter_options, load_config, redact, save_config

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"teacher": {"path": "some/teacher"}, "student": {"architecture": {"num_hidden_layers": 2}}, "data": {"train_files": ["a.txt"]}}


def write(tmp_path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_loads_types_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "loss.kind=jsd", "train.betas=[0.8, 0.9]", "data.packing=false"])
    assert isinstance(cfg, DistillConfig)
    assert cfg.train.lr == 1e-4 and cfg.loss.kind == "jsd" and cfg.train.betas == [0.8, 0.9] and cfg.data.packing is False
    assert cfg.train.max_steps == 1000  # default kept


def test_integer_accepted_where_float_expected(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key: train.lrr"),
        (["bogus.x=1"], "unknown config key: bogus"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
        (["data.packing=maybe"], "data.packing: expected true or false"),
        (["loss.kind=l2"], "loss.kind: must be one of"),
        (["loss.alpha=1.5"], "loss.alpha must be in [0, 1]"),
        (["loss.temperature=0"], "loss.temperature must be > 0"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be > 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
        (["train.epochs=0"], "train.epochs must be > 0"),
        (["data.seq_len=1"], "data.seq_len must be >= 2"),
        (["teacher.quantization=3bit"], "teacher.quantization: must be one of"),
        (["student.path=x"], "set exactly one of student.path, student.architecture and student.prune"),
        (["student.architecture={}", "student.prune={num_hidden_layers: 0}"], "student.prune.num_hidden_layers must be an integer >= 1"),
        (["student.architecture={}", "student.prune={layers: 2}"], "student.prune.layers: not prunable"),
        (["teacher.path="], "teacher.path is required"),
        (["data.dataset=x"], "set exactly one of data.train_files and data.dataset"),
        (["student.architecture.num_hidden_layers=0"], "student.architecture.num_hidden_layers must be > 0"),
        (["trainlr"], "--set expects key.sub=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    data = {**MINIMAL, "train": {"learning_rate": 1}}
    with pytest.raises(ConfigError, match="unknown config key: train.learning_rate"):
        load_config(write(tmp_path, data))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(write(tmp_path, "teacher: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.teacher.path and (cfg.student.path or cfg.student.architecture or cfg.student.init_layers or cfg.student.prune)


def test_every_option_has_help():
    options = list(iter_options())
    assert len(options) > 50
    for key, _, help_text in options:
        assert help_text, f"{key} has no help text"


def test_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefSECRET123")
    assert redact({"a": ["x hf_abcdefSECRET123 y"]}) == {"a": ["x *** y"]}
    cfg = load_config(write(tmp_path, MINIMAL), ["tracking.run_name=run-hf_abcdefSECRET123"])
    save_config(cfg, tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert "SECRET123" not in text and "run-***" in text
    # The saved config loads back as the same job.
    again = load_config(tmp_path / "saved.yaml")
    assert again.teacher.path == cfg.teacher.path


def test_url_credentials_are_redacted_in_the_saved_config(tmp_path):
    cfg = load_config(None, ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.train_files=[a.txt]",
                             "tracking.mlflow_tracking_uri=http://alice:s3cr3t-TOKEN@mlflow.example:5000/x?api_key=abc123&run=1"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t-TOKEN" not in text and "alice" not in text and "abc123" not in text
    assert "http://***@mlflow.example:5000/x?api_key=***&run=1" in text
    assert cfg.tracking.mlflow_tracking_uri.startswith("http://alice:")  # the job itself still uses the real one


def test_errors_and_tracebacks_are_redacted(capsys):
    from distill.errors import ConfigError, main_guard

    def bad_input():
        raise ConfigError("tracking.mlflow_tracking_uri http://bob:hunter2-TOKEN@host unreachable")

    def bug():
        raise RuntimeError("failed to reach https://bob:hunter2-TOKEN@host/?token=zzz999")

    assert main_guard(bad_input) == 2
    assert capsys.readouterr().err.strip() == "distill: error: tracking.mlflow_tracking_uri http://***@host unreachable"
    assert main_guard(bug) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "hunter2" not in err and "zzz999" not in err and "https://***@host/?token=***" in err
