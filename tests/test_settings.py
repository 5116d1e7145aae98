"""Settings from the environment: aliases, derived defaults, secrets that never print."""
import pytest
from pydantic import ValidationError

from schemas.settings import Settings


def test_service_key_alias_callback_default_and_backend(monkeypatch):
    monkeypatch.setenv("SUPABASE_URL", "https://proj.supabase.co/")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "service-secret")
    monkeypatch.setenv("JOB_CALLBACK_SECRET", "callback-secret")
    monkeypatch.setenv("REDIS_URL", "redis://:redis-secret@host:6379/0")
    s = Settings()
    assert s.supabase_service_role_key.get_secret_value() == "service-secret"
    assert s.job_callback_url == "https://proj.supabase.co/functions/v1/job-callback"
    assert s.storage_backend == "supabase"
    shown = repr(s) + str(s) + str(s.model_dump())
    for secret in ("service-secret", "callback-secret", "redis-secret"):
        assert secret not in shown


def test_explicit_callback_url_wins_and_local_storage_without_supabase(monkeypatch):
    monkeypatch.setenv("JOB_CALLBACK_URL", "http://127.0.0.1:9/cb")
    s = Settings()
    assert s.job_callback_url == "http://127.0.0.1:9/cb" and s.storage_backend == "local"


def test_supabase_storage_without_credentials_is_refused(monkeypatch):
    monkeypatch.setenv("GENQ_STORAGE", "supabase")
    with pytest.raises(ValidationError, match="SUPABASE_URL"):
        Settings()


def test_png_compress_level_defaults_to_fastest_and_is_bounded(monkeypatch):
    assert Settings().png_compress_level == 1
    monkeypatch.setenv("GENQ_PNG_COMPRESS_LEVEL", "9")
    assert Settings().png_compress_level == 9
    for bad in ("-1", "10", "fast"):
        monkeypatch.setenv("GENQ_PNG_COMPRESS_LEVEL", bad)
        with pytest.raises(ValidationError, match="GENQ_PNG_COMPRESS_LEVEL"):
            Settings()
