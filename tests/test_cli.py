"""The `mixserve` command line, run as a user would (subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixserve", *args], capture_output=True, text=True,
                          timeout=600)


def test_models_lists_the_embedded_defaults() -> None:
    out = run("models")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout


def test_bad_sampling_value_is_a_clear_error() -> None:
    out = run("generate", "hi", "--temperature", "-1")
    assert out.returncode == 2
    assert "temperature" in out.stderr and "Traceback" not in out.stderr


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    out = run("generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert out.returncode == 2
    assert "nope.gguf" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_generate_streams_text(smollm2_path: str) -> None:
    out = run("generate", "The capital of France is", "--model", smollm2_path, "--temperature", "0",
              "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr


@pytest.mark.slow
def test_generate_n_samples_with_chat(smollm2_path: str) -> None:
    out = run("generate", "Name a fruit.", "--chat", "--model", smollm2_path, "-n", "2", "--seed", "1",
              "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "--- sample 0" in out.stdout and "--- sample 1" in out.stdout


@pytest.mark.slow
def test_chat_session_over_stdin(smollm2_path: str) -> None:
    out = subprocess.run([sys.executable, "-m", "mixserve", "chat", "--model", smollm2_path, "--temperature", "0",
                          "--max-tokens", "12"], input="What is the capital of France?\n/reset\nHi\n/exit\n",
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant> ") == 2
    assert "Paris" in out.stdout
