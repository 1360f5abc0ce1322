"""Config: one TOML file plus VIGIL_* overrides; a bad value names its field."""

import pytest

from services.runtime.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "vigil.toml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    """No file and no environment gives the documented defaults."""
    config = load_config(environ={})
    assert config.nats.servers == ["nats://127.0.0.1:4222"]
    assert config.aggregator.idle_seconds == 30.0 and config.aggregator.max_seconds == 90.0


def test_file_values_are_read(tmp_path):
    """Values in the TOML file override defaults."""
    config = load_config(write(tmp_path, '[detector]\nmodel = "none"\nbatch_size = 4\n'), environ={})
    assert config.detector.model == "none" and config.detector.batch_size == 4


@pytest.mark.parametrize(
    "text, field",
    [
        ('[watcher]\nsettle_seconds = "soon"\n', "$.watcher.settle_seconds"),
        ('[detector]\nprecision = "fp8"\n', "$.detector.precision"),
        ("[detector]\nbatch_size = 1.5\n", "$.detector.batch_size"),
        ("[watcher]\nsettle_secs = 2\n", "settle_secs"),
        ('[nats]\nservers = "nats://x"\n', "$.nats.servers"),
        ("unknown_top = 1\n", "unknown_top"),
    ],
)
def test_bad_file_value_names_the_field(tmp_path, text, field):
    """A wrong type, an unknown option or a bad enum value stops loading with the field named."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert field in str(err.value)


def test_malformed_toml_names_the_file(tmp_path):
    """A file that is not TOML at all is reported with its path."""
    path = write(tmp_path, "[detector\nmodel = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_environment_overrides_file(tmp_path):
    """VIGIL_SECTION__FIELD beats the file; strings become numbers; lists split on commas."""
    path = write(tmp_path, "[detector]\nbatch_size = 4\n")
    env = {
        "VIGIL_DETECTOR__BATCH_SIZE": "32",
        "VIGIL_NATS__SERVERS": "nats://a:1, nats://b:2",
        "VIGIL_MEDIA_ROOT": "/m",
    }
    config = load_config(path, environ=env)
    assert config.detector.batch_size == 32
    assert config.nats.servers == ["nats://a:1", "nats://b:2"]
    assert config.media_root == "/m"


def test_bad_environment_value_names_variable():
    with pytest.raises(ConfigError) as err:
        load_config(environ={"VIGIL_AGGREGATOR__IDLE_SECONDS": "half a minute"})
    assert "$.aggregator.idle_seconds" in str(err.value)
    assert "VIGIL_AGGREGATOR__IDLE_SECONDS" in str(err.value)


def test_foreign_vigil_variables_are_ignored():
    """VIGIL_MODELS_DIR and VIGIL_CONFIG belong to tools, not to the config tree."""
    assert load_config(environ={"VIGIL_MODELS_DIR": "/x", "VIGIL_SOMETHING": "y"}).media_root


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="max_seconds"):
        load_config(environ={"VIGIL_AGGREGATOR__MAX_SECONDS": "5", "VIGIL_AGGREGATOR__IDLE_SECONDS": "10"})


def test_a_world_readable_credential_is_refused_naming_the_file(tmp_path):
    from services.runtime.config import credential

    secret = tmp_path / "nats-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    assert credential("nats-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "hunter2"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{secret} is readable by other users .mode 644."):
        credential("nats-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert credential("db-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None  # not given to this unit


@pytest.mark.parametrize(
    "variable, value, named",
    [
        ("VIGIL_DETECTOR__BATCH_SIZE", "0", "$.detector.batch_size"),
        ("VIGIL_DETECTOR__DECODE_THREADS", "0", "$.detector.decode_threads"),
        ("VIGIL_DETECTOR__CLIP_FPS", "0", "$.detector.clip_fps"),
        ("VIGIL_DETECTOR__BACKEND", "gpu", "detector.backend"),
        ("VIGIL_AGGREGATOR__IDLE_SECONDS", "0", "$.aggregator.idle_seconds"),
        ("VIGIL_WATCHER__SETTLE_SECONDS", "-1", "$.watcher.settle_seconds"),
        ("VIGIL_WATCHER__CAMERA_PREFIX", "site.1-", "watcher.camera_prefix"),
        ("VIGIL_HEARTBEAT_SECONDS", "20", "$.heartbeat_seconds"),
        ("VIGIL_HEALTH__HTTP_PORT", "70000", "$.health.http_port"),
        ("VIGIL_HEALTH__DISK_LOW_PERCENT", "100", "$.health.disk_low_percent"),
        ("VIGIL_HEALTH__STALE_SECONDS", "0", "$.health.stale_seconds"),
        ("VIGIL_HEALTH__WEBHOOK_URL", "ftp://x", "health.webhook_url"),
        ("VIGIL_RETENTION__HIGH_WATERMARK", "lots", "retention.high_watermark"),
        ("VIGIL_RETENTION__DELETE_BATCH", "0", "$.retention.delete_batch"),
        ("VIGIL_RETENTION__MIN_KEEP_SECONDS", "-1", "$.retention.min_keep_seconds"),
        ("VIGIL_NATS__REPLICAS", "2", "$.nats.replicas"),
    ],
)
def test_every_rule_on_a_field_names_the_field(variable, value, named):
    """The rules live on the fields (msgspec Meta and __post_init__): a bad value names its field."""
    with pytest.raises(ConfigError) as err:
        load_config(environ={variable: value})
    assert named in str(err.value)
