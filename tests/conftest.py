"""Shared fixtures: small synthetic datasets that need no download, and fresh databases
(SQLite and PostgreSQL) for the stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

import dicebox
from dicebox.db import make_engine

PG_URL = os.environ.get("DICEBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_schema(request: pytest.FixtureRequest) -> str:
    """A new schema in the test PostgreSQL, dropped after the test. Unreachable -> skipped
    locally, failed when CI=true (the store tests must run against both backends in CI)."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL unreachable at {PG_URL}: {exc.orig}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    request.addfinalizer(drop)
    return schema


def engine_factory(kind: str, request: pytest.FixtureRequest, tmp_path) -> Callable[[], Engine]:
    """``new_engine()`` opening engines on one fresh database of ``kind`` ("sqlite": a file in
    ``tmp_path``; "postgresql": a new schema), each call another engine on the same database,
    as a second process would have. Engines are disposed after the test."""
    engines: list[Engine] = []
    if kind == "sqlite":
        url, options = f"sqlite:///{tmp_path / 'dicebox.db'}", {}
    else:
        url, options = PG_URL, {"connect_args": {"options": f"-csearch_path={_postgres_schema(request)}"}}

    def new_engine() -> Engine:
        engines.append(make_engine(url, **options))
        return engines[-1]

    def dispose() -> None:
        for engine in engines:
            engine.dispose()

    request.addfinalizer(dispose)  # runs before the schema is dropped (last in, first out)
    return new_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def new_engine(request, tmp_path) -> Callable[[], Engine]:
    """:func:`engine_factory` on SQLite and on PostgreSQL."""
    return engine_factory(request.param, request, tmp_path)


def bands(count: int, seed: int, size: int = 8) -> dicebox.Dataset:
    """Three classes: a bright horizontal band at the top, middle or bottom, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(0, 60, size=(count, 1, size, size)).astype(np.uint8)
    third = size // 3
    for i, label in enumerate(labels):
        images[i, 0, label * third:(label + 1) * third, :] += 150
    return dicebox.Dataset.from_arrays(images, labels, ["top", "middle", "bottom"])


MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"},
                  {"type": "dropout", "rate": 0.2}]}

CNN = {"optimizer": {"name": "adam", "learning_rate": 0.005},
       "layers": [{"type": "conv2d", "filters": 4, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                  {"type": "maxpool2d", "kernel": [2, 2]},
                  {"type": "dropout", "rate": 0.1},
                  {"type": "dense", "size": 8, "activation": "tanh"}]}


@pytest.fixture(scope="session")
def band_data() -> tuple[dicebox.Dataset, dicebox.Dataset]:
    return bands(240, 1), bands(90, 2)


@pytest.fixture(scope="session")
def trained(band_data) -> dicebox.Model:
    train, val = band_data
    return dicebox.train(MLP, train, val=val, epochs=4, batch_size=16, patience=0, threads=1)
