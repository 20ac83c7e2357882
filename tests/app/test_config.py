"""Settings from PETVIT_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, describe_invalid_settings


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("PETVIT_CHECKPOINT", "/models/x.safetensors")
    monkeypatch.setenv("PETVIT_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("PETVIT_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("PETVIT_API_KEY", "zq-secret-91")
    monkeypatch.setenv("PETVIT_DTYPE", "")  # compose passes unset variables through as empty: means default
    s = Settings()
    assert s.checkpoint == Path("/models/x.safetensors") and s.max_batch_size == 32
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "zq-secret-91" and "zq-secret" not in repr(s)
    assert s.dtype == "auto"


def test_invalid_settings_are_refused(monkeypatch):
    monkeypatch.setenv("PETVIT_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_a_queue_smaller_than_one_full_request_is_refused(monkeypatch):
    # Requests are queued whole: 16 images could never enter a queue of 8, and would be told "429, retry" for ever.
    monkeypatch.setenv("PETVIT_QUEUE_LIMIT", "8")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "PETVIT_QUEUE_LIMIT (8) must be at least PETVIT_MAX_FILES (16)" in describe_invalid_settings(info.value)
