"""The Hugging Face hub: llama2.c's published checkpoints by name, and the TinyStories data set.

Torch-free, and below the training package (it imports nothing from it). Files go into
huggingface_hub's own cache (HF_HUB_CACHE, ~/.cache/huggingface/hub by default), so
`resolve_model` finds them later without any network access.

Tokenizers: stories260K ships its own (`stories260K/tok512.bin` in karpathy/tinyllamas). The
15M/42M/110M models use the Llama 2 tokenizer, which llama2.c keeps in its git repository as
tokenizer.bin and which is not in karpathy/tinyllamas. We fetch the Llama 2 SentencePiece model
(`tokenizer.model`) from NousResearch/Llama-2-7b-hf, an ungated copy of Meta's Llama-2-7b-hf, and
convert it with `tokenizer.sentencepiece_to_bin` (the same bytes as llama2.c's tokenizer.bin:
checked by sha256) into llama2nb's cache (LLAMA2NB_CACHE, ~/.cache/llama2nb by default).

Unreachable hub: huggingface_hub 2.x alone retries a failed first request for minutes (five
retries with a minute's timeout each, logging every one). So each download starts with one
request of our own (`_check_reachable`): HUB_ATTEMPTS tries, each given `hub_timeout()` seconds
(HF_HUB_ETAG_TIMEOUT if the user set it, else HUB_TIMEOUT), the library's retry log silenced.
No answer ends the command with one line, or returns the copy already in the cache. With
HF_HUB_OFFLINE set, only the cache is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import HubError, Llama2nbError

TINYLLAMAS = "karpathy/tinyllamas"
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_ARCHIVE = "TinyStories_all_data.tar.gz"

HUB_TIMEOUT = 5.0  # seconds a request waits for the hub's answer, unless HF_HUB_ETAG_TIMEOUT is set
HUB_ATTEMPTS = 2  # tries of the first request before the hub counts as unreachable
HUB_RETRY_WAIT = 1.0  # seconds between those tries

# sha256 of llama2.c's tokenizer.bin, which our export of the Llama 2 tokenizer.model reproduces
LLAMA2_TOKENIZER_BIN_SHA256 = "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361"


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    convert_to: str | None = None  # a SentencePiece .model to export as this llama2.c .bin name
    sha256: str | None = None  # expected sha256 of the final .bin
    repo_type: str | None = None  # "dataset" for data sets; None: a model repository


TINYSTORIES = HubFile(TINYSTORIES_REPO, TINYSTORIES_ARCHIVE, repo_type="dataset")
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


def llama2nb_cache() -> Path:
    return Path(os.environ.get("LLAMA2NB_CACHE") or Path.home() / ".cache" / "llama2nb")


def canonical_name(name: str) -> str | None:
    """The KNOWN_MODELS key `name` means (any case, with or without .bin), or None."""
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
    from .tokenizer import sentencepiece_to_bin

    out = llama2nb_cache() / "tokenizers" / spec.convert_to
    if not out.is_file():
        sentencepiece_to_bin(model_path, out)
        if spec.sha256 and _sha256(out) != spec.sha256:
            warnings.warn(f"{out}: sha256 differs from llama2.c's tokenizer.bin (expected {spec.sha256}); "
                          "the tokenizer.model fetched from the hub is not the Llama 2 one")
    return out


def _cached(spec: HubFile, cache_dir: str | os.PathLike | None) -> str | None:
    """The hub cache's copy of `spec`, found without network; None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo, spec.filename, cache_dir=cache_dir, repo_type=spec.repo_type)
    return found if isinstance(found, str) else None  # None, or the "known not to exist" sentinel


def _usable(spec: HubFile, path: str) -> Path:
    """The file llama2nb uses for the downloaded `path`: itself, or its llama2.c conversion."""
    return _converted(spec, path) if spec.convert_to else Path(path)


def resolve_model(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(checkpoint, tokenizer) of a known model already in the local cache, without network;
    None when `name` is not a known model or it has not been downloaded."""
    key = canonical_name(name)
    if key is None:
        return None
    model = KNOWN_MODELS[key]
    checkpoint, tokenizer = _cached(model.checkpoint, cache_dir), _cached(model.tokenizer, cache_dir)
    if checkpoint is None or tokenizer is None:
        return None
    try:
        return _usable(model.checkpoint, checkpoint), _usable(model.tokenizer, tokenizer)
    except (OSError, Llama2nbError):  # an unreadable cache entry counts as not downloaded
        return None


def hub_timeout() -> float:
    """Seconds a request waits for the hub: HF_HUB_ETAG_TIMEOUT when the user set it (as
    hf_hub_download itself lets it override its argument), else HUB_TIMEOUT."""
    from huggingface_hub import constants

    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        return float(constants.HF_HUB_ETAG_TIMEOUT)
    return HUB_TIMEOUT


@contextlib.contextmanager
def _quiet_hub_log() -> Iterator[None]:
    """Errors only from huggingface_hub's logger (its retry warnings are not for users)."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _network_failure(e: BaseException) -> bool:
    """A failure at the network boundary, not a bug: OSError (socket errors and timeouts as
    requests raises them, huggingface_hub's HTTP and cache errors) or the TransportError family
    of httpx, which newer huggingface_hub versions use."""
    return isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def _check_reachable(spec: HubFile, timeout: float) -> None:
    """Ask the hub for `spec`'s metadata, HUB_ATTEMPTS times HUB_RETRY_WAIT apart, each request
    given `timeout` seconds. Returns when the hub answered; an HTTP error (no such file, ...) is
    a HubError naming it, and so is no answer at all."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    url = hf_hub_url(spec.repo, spec.filename, repo_type=spec.repo_type)
    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            get_hf_file_metadata(url, timeout=timeout)
            return
        except HfHubHTTPError as e:  # an answer: an error status (no such file, ...)
            raise HubError(f"{spec.repo}/{spec.filename}: download failed: {_first_line(e)}") from None
        except Exception as e:
            if not _network_failure(e):
                raise
            failure = e  # no answer
        if attempt < HUB_ATTEMPTS:
            time.sleep(HUB_RETRY_WAIT)
    raise HubError(f"{url}: expected an answer from the Hugging Face hub, found none in {HUB_ATTEMPTS} attempts "
                   f"with a {timeout:g} s timeout each ({_first_line(failure)}); check the network")


def _download(spec: HubFile, cache_dir) -> str:
    """hf_hub_download of `spec`, after _check_reachable; with HF_HUB_OFFLINE set, or when the
    hub does not answer, the cached copy if there is one."""
    from huggingface_hub import constants, hf_hub_download

    with _quiet_hub_log():
        if not constants.HF_HUB_OFFLINE:
            try:
                _check_reachable(spec, hub_timeout())
            except HubError:
                cached = _cached(spec, cache_dir)
                if cached is None:
                    raise
                return cached
        try:
            return hf_hub_download(spec.repo, spec.filename, repo_type=spec.repo_type, cache_dir=cache_dir,
                                   etag_timeout=hub_timeout())
        except Exception as e:
            if not _network_failure(e):
                raise
            if constants.HF_HUB_OFFLINE:
                raise HubError(f"{spec.repo}/{spec.filename}: expected it in the hub cache (HF_HUB_OFFLINE is set), "
                               "found nothing; unset HF_HUB_OFFLINE to download it") from None
            raise HubError(f"{spec.repo}/{spec.filename}: download failed: {_first_line(e)}") from None


def download_model(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Download a known model and its tokenizer into the hub cache (with huggingface_hub's
    progress bars); returns (checkpoint, tokenizer) as resolve_model would."""
    key = canonical_name(name)
    if key is None:
        raise HubError(f"model name: expected one of {', '.join(KNOWN_MODELS)}, found {name!r}")
    model = KNOWN_MODELS[key]
    checkpoint = _download(model.checkpoint, cache_dir)
    tokenizer = _download(model.tokenizer, cache_dir)
    return _usable(model.checkpoint, checkpoint), _usable(model.tokenizer, tokenizer)


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download_file(repo: str, filename: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Any file of a Hub model repository by repo id and file name (a GGUF model, say), through
    the hub cache, with the same bounded attempts and one-line errors as the known models; the
    cached copy when the hub does not answer or HF_HUB_OFFLINE is set."""
    if not REPO_ID.fullmatch(repo):
        raise HubError(f"repository: expected an id like owner/name, found {repo!r}")
    if not filename or filename.startswith("/") or ".." in Path(filename).parts:
        raise HubError(f"{repo}: file name: expected a path inside the repository, found {filename!r}")
    return Path(_download(HubFile(repo, filename), cache_dir))


def download_tinystories(target: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch roneneldan/TinyStories' TinyStories_all_data.tar.gz (through the hub cache) and
    extract its JSON shards into the folder `target` (atomically: a temp folder renamed into
    place; a folder that already holds shards is kept). Returns `target`."""
    archive = _download(TINYSTORIES, cache_dir)
    target = Path(target)
    if target.is_dir() and any(target.glob("*.json")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _extract_json_shards(Path(archive), tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract_json_shards(archive: Path, folder: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")]
            if not members:
                raise HubError(f"{archive}: expected JSON shards in the archive, found none")
            for m in members:
                with open(folder / Path(m.name).name, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(m), out)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise HubError(f"{archive}: expected a .tar.gz archive, found unreadable data ({e})") from None
