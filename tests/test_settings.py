"""dicebox.settings: environment names (new and original), flags winning, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicebox.settings import Settings, is_loopback

ENV_NAMES = ["DICEBOX_HOME", "DICEBOX_DATABASE_URL", "DICEBOX_BROKER_URL", "DICEBOX_API_KEY", "API_ACCESS_KEY",
             "DICEBOX_SERVER_URL", "SENSORY_SERVER", "DICEBOX_THREADS", "DICEBOX_DEVICE",
             "TRAINING_PROCESSOR_SERVICE_RABBITMQ_SERVER", "TRAINING_PROCESSOR_SERVICE_RABBITMQ_USERNAME",
             "TRAINING_PROCESSOR_SERVICE_RABBITMQ_PASSWORD", "LOAD_BEST_WEIGHTS_ON_START", "MODEL_WEIGHTS_FILENAME"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("DICEBOX_HOME", str(tmp_path))
    s = Settings()
    assert s.home == tmp_path
    assert s.database_url == f"sqlite:///{tmp_path / 'dicebox.db'}"
    assert s.embedded and s.api_key is None and s.device == "auto" and s.threads is None
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_environment_and_original_names(monkeypatch):
    monkeypatch.setenv("API_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("SENSORY_SERVER", "http://10.0.0.5:8000")
    monkeypatch.setenv("TRAINING_PROCESSOR_SERVICE_RABBITMQ_SERVER", "rabbit")
    monkeypatch.setenv("TRAINING_PROCESSOR_SERVICE_RABBITMQ_USERNAME", "dice")
    monkeypatch.setenv("TRAINING_PROCESSOR_SERVICE_RABBITMQ_PASSWORD", "p@ss/word")
    monkeypatch.setenv("LOAD_BEST_WEIGHTS_ON_START", "true")
    monkeypatch.setenv("MODEL_WEIGHTS_FILENAME", "best.safetensors")
    monkeypatch.setenv("DICEBOX_THREADS", "2")
    s = Settings()
    assert s.api_key.get_secret_value() == "s3cret"
    assert s.server_url == "http://10.0.0.5:8000"
    assert s.broker_url == "amqp://dice:p%40ss%2Fword@rabbit:5672/%2F" and not s.embedded
    assert s.load_best_weights_on_start and s.model_weights_filename == "best.safetensors" and s.threads == 2


def test_new_names_win_over_derived_ones_and_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("DICEBOX_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    monkeypatch.setenv("TRAINING_PROCESSOR_SERVICE_RABBITMQ_SERVER", "elsewhere")
    monkeypatch.setenv("DICEBOX_DEVICE", "cuda")
    s = Settings(device="cpu", port=9001)
    assert s.broker_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert (s.device, s.port) == ("cpu", 9001)


def test_secrets_do_not_show_in_repr(monkeypatch):
    monkeypatch.setenv("DICEBOX_API_KEY", "do-not-print-me")
    assert "do-not-print-me" not in repr(Settings()) and "do-not-print-me" not in str(Settings())


@pytest.mark.parametrize("overrides, field", [
    ({"host": "0.0.0.0"}, "host"),
    ({"host": "192.168.1.4", "api_key": "  "}, "host"),
    ({"broker_url": "redis://localhost"}, "broker_url"),
    ({"device": "tpu"}, "device"),
    ({"threads": 0}, "threads"),
    ({"port": 70000}, "port"),
    ({"model_weights_filename": "../x"}, "model_weights_filename"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        Settings(**overrides)


def test_non_loopback_host_with_a_key_is_allowed():
    assert Settings(host="0.0.0.0", api_key="k").host == "0.0.0.0"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("10.1.2.3", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_unrelated_environment_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("HOME", "/nowhere")
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("HOST", "0.0.0.0")
    s = Settings(home="/tmp/dicebox-home")
    assert (str(s.home), s.port, s.host) == ("/tmp/dicebox-home", 8000, "127.0.0.1")
