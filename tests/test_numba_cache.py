"""No writable cache anywhere: the package installed where its user cannot write (no
`__pycache__` beside the sources) and HOME unusable. Every command still runs: Numba's cache
moves to a private temp folder, or compiling goes without a cache, with one note.

The tests run as root, which permission bits do not stop, so "cannot write" is made real the
way it is for root too: a *file* named `__pycache__` in every package folder, and HOME and
XDG_CACHE_HOME under a file, where no folder can ever be created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama2nb.numba_cache import cache_enabled

from .conftest import REPO
from .sampling_fixtures import write_tiny_model

CLI = "from llama2nb.cli import main; main(prog_name='llama2nb')"


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("nocache")
    site = base / "site"
    shutil.copytree(REPO / "llama2nb", site / "llama2nb",
                    ignore=shutil.ignore_patterns("__pycache__", "checkpoints", "*.nbi", "*.nbc"))
    folders = [site / "llama2nb", *(p for p in (site / "llama2nb").rglob("*") if p.is_dir())]
    for folder in folders:
        (folder / "__pycache__").write_text("a file where Numba and Python would make a folder")
    (base / "blocker").write_text("")
    (base / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(site), HOME=str(base / "blocker" / "home"), XDG_CACHE_HOME=str(base / "blocker" / "c"),
               TMPDIR=str(base / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    return {"env": env, "site": site, "tmp": base / "tmp", "model": write_tiny_model(base / "model", seq_len=32)}


def run(env: dict, *args: str, code: str = CLI) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=env["TMPDIR"], timeout=600)


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def test_the_copy_is_what_runs(unwritable):
    done = run(unwritable["env"], code="import llama2nb; print(llama2nb.__file__)")
    assert done.stdout.strip() == str(unwritable["site"] / "llama2nb" / "__init__.py"), done.stderr


def test_cache_moves_to_a_private_temp_folder(unwritable):
    env, folder = unwritable["env"], unwritable["tmp"] / f"llama2nb-numba-{os.getuid()}"
    shutil.rmtree(folder, ignore_errors=True)
    helped = run(env, "--help")
    assert helped.returncode == 0 and "Usage:" in helped.stdout, helped.stderr
    assert notes(helped.stderr) == [f"note: Numba cannot cache beside {unwritable['site'] / 'llama2nb'} nor in the "
                                    f"user cache folder: caching compiled kernels in {folder}"]
    assert helped.stderr.count("\n") == 1  # nothing else
    assert (folder.stat().st_mode & 0o777) == 0o700
    sampled = run(env, "sample", str(unwritable["model"]), "-n", "6", "-s", "1")
    assert sampled.returncode == 0, sampled.stderr
    assert len(notes(sampled.stderr)) == 1 and "6 positions" in sampled.stderr
    assert list(folder.rglob("sampler._softmax-*.nbi")) and list(folder.rglob("*.nbc"))  # kernels cached there
    assert list(folder.rglob("forward.attention_input__*.nbi"))  # the engine's families too


def test_no_folder_at_all_compiles_without_a_cache(unwritable):
    env, folder = unwritable["env"], unwritable["tmp"] / f"llama2nb-numba-{os.getuid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("not a folder")  # the temp folder is unusable too
    try:
        helped = run(env, "--help")
        assert helped.returncode == 0, helped.stderr
        assert notes(helped.stderr) == [f"note: no writable folder for Numba's cache (beside "
                                        f"{unwritable['site'] / 'llama2nb'}, the user cache folder, {unwritable['tmp']}): "
                                        "compiling kernels anew every run"]
        code = ("import numpy as np; from llama2nb.numba_cache import cache_enabled; from llama2nb.sampler import "
                "Sampler; print(cache_enabled(), Sampler(4, seed=1).sample(np.arange(4, dtype=np.float32)))")
        sampled = run(env, code=code)
        assert sampled.returncode == 0 and sampled.stdout.split() == ["False", "3"], sampled.stderr
        assert len(notes(sampled.stderr)) == 1
        story = run(env, "sample", str(unwritable["model"]), "-n", "6", "-s", "1")  # the engine, uncached
        assert story.returncode == 0 and len(notes(story.stderr)) == 1, story.stderr
    finally:
        folder.unlink()


def test_a_shared_temp_folder_is_not_trusted(unwritable, tmp_path):
    """A folder of that name that others can write (or that is not ours) could hold planted
    compiled code: it is not used."""
    env, folder = unwritable["env"], unwritable["tmp"] / f"llama2nb-numba-{os.getuid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    folder.chmod(0o777)
    try:
        done = run(env, code="from llama2nb.numba_cache import cache_enabled; print(cache_enabled())")
        assert done.stdout.split() == ["False"] and "anew every run" in done.stderr, done.stderr
    finally:
        shutil.rmtree(folder)


def test_a_writable_package_caches_beside_itself_without_a_word(capsys):
    assert cache_enabled() is True
    assert "note:" not in capsys.readouterr().err


WARM_SCRIPT = """
import hashlib
import sys
from llama2nb import Transformer
model = Transformer.load(sys.argv[1], warm_up=False)
logits = model.forward(1, 0).copy()
caches = {type(model.kernels.embed_f32._cache).__name__}
print(hashlib.sha256(logits.tobytes()).hexdigest(), "numba.np.linalg" in sys.modules, *sorted(caches))
"""


def test_a_warm_start_loads_kernels_without_numba_s_registry_refresh(tmp_path):
    """A first process compiles into an empty disk cache; the next loads the same kernels
    without Numba's refresh (numba.np.linalg, which only the refresh imports, stays unimported)
    and computes the same logits, bit for bit, with fastmath: a caller's cached code calls its
    own copies of its callees, as when it was compiled (numba_cache.keep_linked_copies_private;
    without it the logits differed in the last bits). (A miss compiles as before: every other test that
    compiles a family goes through the same cache class.)"""
    model = write_tiny_model(tmp_path / "model", seq_len=32)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}  # empty: the first run compiles
    runs = [subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(model)], capture_output=True, text=True,
                           cwd=REPO, timeout=600, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    first, warm = (r.stdout.split() for r in runs)
    assert first[0] == warm[0] and first[2] == warm[2] == "_LoadWithoutRefresh"
    assert warm[1] == "False"
