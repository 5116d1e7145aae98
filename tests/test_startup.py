"""startup.sh: says precisely what is missing, and prints the plan before exec'ing the orchestrator."""
import os
import subprocess

from tests.conftest import ROOT


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHON": "python"}
    return subprocess.run(["bash", str(ROOT / "startup.sh"), *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_missing_environment_is_named_and_nothing_starts():
    out = run({"SDXL_MODEL_PATH": "/nonexistent/sdxl.safetensors"})
    assert out.returncode == 2
    for name in ("REDIS_URL", "SUPABASE_URL", "JOB_CALLBACK_SECRET", "SUPABASE_SERVICE_ROLE_KEY",
                 "SDXL_MODEL_PATH=/nonexistent/sdxl.safetensors does not exist", "SDXL_CONFIG_PATH"):
        assert name in out.stderr, out.stderr


def test_a_complete_environment_prints_the_plan_without_secrets(redis_server):
    env = {"REDIS_URL": redis_server.url, "SUPABASE_URL": "http://127.0.0.1:9", "SUPABASE_SERVICE_KEY": "sk-secret",
           "JOB_CALLBACK_SECRET": "cb-secret", "SDXL_MODEL_PATH": "tiny", "QWEN_INSTRUCT_MODEL_PATH": "tiny",
           "GENQ_SIMULATED_GPUS": "48GB"}
    out = run(env, "--check")
    assert out.returncode == 0, out.stderr
    assert "redis reachable" in out.stdout and "sdxl" in out.stdout and "chat" in out.stdout
    assert "sk-secret" not in out.stdout + out.stderr and "cb-secret" not in out.stdout + out.stderr
