"""The Hugging Face hub: llama2.c's published checkpoints by name, and the TinyStories data set.

Torch-free. Files go into huggingface_hub's own cache (HF_HUB_CACHE, ~/.cache/huggingface/hub
by default), so `resolve_model` finds them later without any network access.

Tokenizers: stories260K ships its own (`stories260K/tok512.bin` in karpathy/tinyllamas). The
15M/42M/110M models use the Llama 2 tokenizer, which llama2.c keeps in its git repository as
tokenizer.bin and which is not in karpathy/tinyllamas. We fetch the Llama 2 SentencePiece model
(`tokenizer.model`) from NousResearch/Llama-2-7b-hf, an ungated copy of Meta's Llama-2-7b-hf, and
convert it with our own export (the same bytes as llama2.c's tokenizer.bin: checked by sha256)
into llama2nb's cache (LLAMA2NB_CACHE, ~/.cache/llama2nb by default).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

TINYLLAMAS = "karpathy/tinyllamas"
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_ARCHIVE = "TinyStories_all_data.tar.gz"

# sha256 of llama2.c's tokenizer.bin, which our export of the Llama 2 tokenizer.model reproduces
LLAMA2_TOKENIZER_BIN_SHA256 = "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361"


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    convert_to: str | None = None  # a SentencePiece .model to export as this llama2.c .bin name
    sha256: str | None = None  # expected sha256 of the final .bin


LLAMA2_TOKENIZER = HubFile("NousResearch/Llama-2-7b-hf", "tokenizer.model",
                           convert_to="llama2-tokenizer.bin", sha256=LLAMA2_TOKENIZER_BIN_SHA256)


@dataclass(frozen=True)
class HubModel:
    checkpoint: HubFile
    tokenizer: HubFile
    description: str


KNOWN_MODELS: dict[str, HubModel] = {
    "stories260K": HubModel(HubFile(TINYLLAMAS, "stories260K/stories260K.bin"),
                            HubFile(TINYLLAMAS, "stories260K/tok512.bin"),
                            "dim 64, 5 layers, 8 heads (4 kv), vocab 512, seq 512; 1.1 MB"),
    "stories15M": HubModel(HubFile(TINYLLAMAS, "stories15M.bin"), LLAMA2_TOKENIZER,
                           "dim 288, 6 layers, 6 heads, vocab 32000, seq 256; 61 MB"),
    "stories42M": HubModel(HubFile(TINYLLAMAS, "stories42M.bin"), LLAMA2_TOKENIZER,
                           "dim 512, 8 layers, 8 heads, vocab 32000, seq 1024; 167 MB"),
    "stories110M": HubModel(HubFile(TINYLLAMAS, "stories110M.bin"), LLAMA2_TOKENIZER,
                            "dim 768, 12 layers, 12 heads, vocab 32000, seq 1024; 438 MB"),
}


class HubError(ValueError):
    """A download or lookup that failed; the message is one line for users."""


def llama2nb_cache() -> Path:
    return Path(os.environ.get("LLAMA2NB_CACHE") or Path.home() / ".cache" / "llama2nb")


def _canonical(name: str) -> str | None:
    key = name[:-4] if name.endswith(".bin") else name
    for known in KNOWN_MODELS:
        if known.lower() == key.lower():
            return known
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _converted(spec: HubFile, model_path: str) -> Path:
    """The llama2.c .bin for a cached SentencePiece model; written once into llama2nb's cache."""
    from .training.vocab import export_tokenizer  # torch-free

    out = llama2nb_cache() / "tokenizers" / spec.convert_to
    if not out.is_file():
        export_tokenizer(model_path, out)
        if spec.sha256 and _sha256(out) != spec.sha256:
            warnings.warn(f"{out}: sha256 differs from llama2.c's tokenizer.bin (expected {spec.sha256}); "
                          "the tokenizer.model fetched from the hub is not the Llama 2 one")
    return out


def _from_cache(spec: HubFile, cache_dir: str | os.PathLike | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(spec.repo, spec.filename, cache_dir=cache_dir)
        if not isinstance(found, str):  # None, or the "known not to exist" sentinel
            return None
        return _converted(spec, found) if spec.convert_to else Path(found)
    except (OSError, ValueError):  # an unreadable cache entry counts as not downloaded
        return None


def resolve_model(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(checkpoint, tokenizer) of a known model already in the local cache, without network;
    None when `name` is not a known model or it has not been downloaded."""
    key = _canonical(name)
    if key is None:
        return None
    model = KNOWN_MODELS[key]
    checkpoint = _from_cache(model.checkpoint, cache_dir)
    if checkpoint is None:
        return None
    tokenizer = _from_cache(model.tokenizer, cache_dir)
    if tokenizer is None:
        return None
    return checkpoint, tokenizer


def _download(spec: HubFile, cache_dir, repo_type: str | None = None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(spec.repo, spec.filename, repo_type=repo_type, cache_dir=cache_dir)
    except Exception as e:  # network, HTTP and repository errors all end the command with one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"{spec.repo}/{spec.filename}: download failed: {type(e).__name__}: {first}") from None


def download_model(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Download a known model and its tokenizer into the hub cache (with huggingface_hub's
    progress bars); returns (checkpoint, tokenizer) as resolve_model would."""
    key = _canonical(name)
    if key is None:
        raise HubError(f"model name: expected one of {', '.join(KNOWN_MODELS)}, found {name!r}")
    model = KNOWN_MODELS[key]
    checkpoint = Path(_download(model.checkpoint, cache_dir))
    tok = _download(model.tokenizer, cache_dir)
    tokenizer = _converted(model.tokenizer, tok) if model.tokenizer.convert_to else Path(tok)
    return checkpoint, tokenizer


def download_tinystories(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch roneneldan/TinyStories' TinyStories_all_data.tar.gz (through the hub cache) and
    extract its JSON shards into DATA_DIR/TinyStories_all_data/ (atomically: a temp folder
    renamed into place). Returns that folder."""
    from .training.data import TINYSTORIES_DIR

    archive = _download(HubFile(TINYSTORIES_REPO, TINYSTORIES_ARCHIVE), cache_dir, repo_type="dataset")
    target = Path(data_dir) / TINYSTORIES_DIR
    if target.is_dir() and any(target.glob("*.json")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")]
                if not members:
                    raise HubError(f"{archive}: expected JSON shards in the archive, found none")
                for m in members:
                    src = tar.extractfile(m)
                    with open(tmp / Path(m.name).name, "wb") as out:
                        shutil.copyfileobj(src, out)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise HubError(f"{archive}: expected a .tar.gz archive, found unreadable data ({e})") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
