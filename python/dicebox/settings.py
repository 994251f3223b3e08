"""The one settings object of the service side (server, processors, CLI).

Read once from the environment (``DICEBOX_*``, and the original dicebox names where they
exist), overridden by command-line flags (``Settings(**flags)``), validated, then passed
down. Nothing else in dicebox reads these variables on its own.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
# URLs that may hold a password (user:password@host); shown without it in repr().
URL_FIELDS = ("database_url", "broker_url", "server_url")


def without_password(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable URL>"


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Configuration. Environment names are listed with each field; flags win."""

    # Case-sensitive, so the lower-case field names (the flags) never pick up HOME or PORT.
    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True, validate_default=True,
                                      case_sensitive=True)

    home: Path = Field(default=Path("~/.dicebox"), validation_alias=AliasChoices("home", "DICEBOX_HOME"))
    database_url: str = Field(default="", validation_alias=AliasChoices("database_url", "DICEBOX_DATABASE_URL"))
    broker_url: str = Field(default="", validation_alias=AliasChoices("broker_url", "DICEBOX_BROKER_URL"))
    api_key: SecretStr | None = Field(default=None,
                                      validation_alias=AliasChoices("api_key", "DICEBOX_API_KEY", "API_ACCESS_KEY"))
    server_url: str = Field(default="http://127.0.0.1:8000",
                            validation_alias=AliasChoices("server_url", "DICEBOX_SERVER_URL", "SENSORY_SERVER"))
    threads: int | None = Field(default=None, ge=1, le=1024,
                                validation_alias=AliasChoices("threads", "DICEBOX_THREADS"))
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto",
                                                   validation_alias=AliasChoices("device", "DICEBOX_DEVICE"))
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # The original processors' names: a RabbitMQ host with its user and password, warm
    # starts from the best weights, and the weights file name of exported models.
    rabbitmq_server: str = Field(default="", validation_alias=AliasChoices(
        "rabbitmq_server", "TRAINING_PROCESSOR_SERVICE_RABBITMQ_SERVER"))
    rabbitmq_username: str = Field(default="guest", validation_alias=AliasChoices(
        "rabbitmq_username", "TRAINING_PROCESSOR_SERVICE_RABBITMQ_USERNAME"))
    rabbitmq_password: SecretStr = Field(default=SecretStr("guest"), validation_alias=AliasChoices(
        "rabbitmq_password", "TRAINING_PROCESSOR_SERVICE_RABBITMQ_PASSWORD"))
    load_best_weights_on_start: bool = Field(default=False, validation_alias=AliasChoices(
        "load_best_weights_on_start", "LOAD_BEST_WEIGHTS_ON_START"))
    model_weights_filename: str = Field(default="weights.safetensors", validation_alias=AliasChoices(
        "model_weights_filename", "MODEL_WEIGHTS_FILENAME"))

    # Budgets that bound what one request may ask of the service (each answered with a 4xx
    # that names the limit when exceeded).
    max_body_bytes: int = Field(default=64 << 20, ge=1024, validation_alias=AliasChoices(
        "max_body_bytes", "DICEBOX_MAX_BODY_BYTES"))
    # Checkpoints and model weights uploaded by processors (under /v1/worker/): a network at
    # the size limit of a job (50M parameters) has a checkpoint of about 800 MB.
    max_artifact_bytes: int = Field(default=2 << 30, ge=1024, validation_alias=AliasChoices(
        "max_artifact_bytes", "DICEBOX_MAX_ARTIFACT_BYTES"))
    max_image_bytes: int = Field(default=8 << 20, ge=1024, validation_alias=AliasChoices(
        "max_image_bytes", "DICEBOX_MAX_IMAGE_BYTES"))
    max_image_pixels: int = Field(default=24_000_000, ge=1, validation_alias=AliasChoices(
        "max_image_pixels", "DICEBOX_MAX_IMAGE_PIXELS"))
    max_images_per_request: int = Field(default=1000, ge=1, validation_alias=AliasChoices(
        "max_images_per_request", "DICEBOX_MAX_IMAGES_PER_REQUEST"))
    max_epochs: int = Field(default=1000, ge=1, validation_alias=AliasChoices(
        "max_epochs", "DICEBOX_MAX_EPOCHS"))
    max_population: int = Field(default=200, ge=2, validation_alias=AliasChoices(
        "max_population", "DICEBOX_MAX_POPULATION"))
    max_generations: int = Field(default=200, ge=1, validation_alias=AliasChoices(
        "max_generations", "DICEBOX_MAX_GENERATIONS"))
    # Largest dataset side in pixels and most categories a dataset may have.
    max_dataset_side: int = Field(default=512, ge=1, validation_alias=AliasChoices(
        "max_dataset_side", "DICEBOX_MAX_DATASET_SIDE"))
    max_categories: int = Field(default=1000, ge=2, validation_alias=AliasChoices(
        "max_categories", "DICEBOX_MAX_CATEGORIES"))
    # The compatibility API (/api/...) works on this dataset and trains this genome.
    default_dataset: str = Field(default="dicebox", validation_alias=AliasChoices(
        "default_dataset", "DICEBOX_DEFAULT_DATASET"))
    default_genome: str = Field(default="", validation_alias=AliasChoices(
        "default_genome", "DICEBOX_DEFAULT_GENOME"))
    # Lease of a running job: a processor renews it well before it ends; a dead one's job is
    # taken up again this long after its last renewal.
    lease_seconds: float = Field(default=30.0, gt=0, validation_alias=AliasChoices(
        "lease_seconds", "DICEBOX_LEASE_SECONDS"))
    # How long a client has to send a request (headers and body) from its first byte, plus a
    # second per 64 KiB of body received: a slow client is cut off (408) instead of holding
    # a connection open forever.
    request_read_seconds: float = Field(default=60.0, gt=0, le=3600, validation_alias=AliasChoices(
        "request_read_seconds", "DICEBOX_REQUEST_READ_SECONDS"))
    # Trained models kept loaded for classification (least recently used dropped first).
    model_cache_size: int = Field(default=8, ge=1, validation_alias=AliasChoices(
        "model_cache_size", "DICEBOX_MODEL_CACHE_SIZE"))

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("database_url", "broker_url", "server_url", "rabbitmq_server")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("model_weights_filename")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in {".", ".."}:
            raise ValueError(f"must be a plain file name, got {value!r}")
        return value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'dicebox.db'}"
        if not self.broker_url and self.rabbitmq_server:
            user = quote(self.rabbitmq_username, safe="")
            password = quote(self.rabbitmq_password.get_secret_value(), safe="")
            self.broker_url = f"amqp://{user}:{password}@{self.rabbitmq_server}:5672/%2F"
        if self.broker_url and not self.broker_url.startswith(("amqp://", "amqps://")):
            raise ValueError("broker_url: expected an amqp:// or amqps:// URL, or nothing for the embedded queue")
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            self.api_key = None
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(f"host: {self.host} is not a loopback address; set DICEBOX_API_KEY (or "
                             "API_ACCESS_KEY) before serving beyond this machine")
        return self

    def __repr_args__(self) -> Any:
        # Settings end up in tracebacks and debug output: never with a URL's password (the
        # SecretStr fields already print as stars).
        for name, value in super().__repr_args__():
            yield name, without_password(value) if name in URL_FIELDS and isinstance(value, str) else value

    @property
    def embedded(self) -> bool:
        """True when jobs go through the embedded queue (no broker configured)."""
        return not self.broker_url
