"""Record logits for every tiny layout (and stories260K where ../shared has it) x fastmath setting,
token by token and as a prefill, and print the max abs difference against tests/reference.py.

    cd TREE && python /path/to/scripts/logits_snapshot.py OUT.npz

Run it in two trees (say, before and after a refactor) and compare the two .npz files array by
array: the check behind "logits bit-identical" claims. The tree is taken from the current folder.
"""
import sys, tempfile
from dataclasses import replace
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path.cwd()))
from tests.conftest import TINY_MODELS, STORIES260K
from tests.reference import Reference
try:
    from llama2nb.files.llama2c import write_checkpoint
    from llama2nb.testmodels import random_weights
except ImportError:  # trees from before the house issue
    from llama2nb.checkpoint import random_weights, write_checkpoint
from llama2nb import Transformer

out = {}
folder = Path(tempfile.mkdtemp())
paths = {}
for i, (name, config) in enumerate(TINY_MODELS.items()):
    paths[name] = folder / f"{name}.bin"
    write_checkpoint(paths[name], config, random_weights(config, seed=i, scale=0.1))
if STORIES260K.exists():
    paths["stories260K"] = STORIES260K
for name, path in paths.items():
    for fm in ("off", "reassoc", "full"):
        m = Transformer.load(path, fastmath=fm)
        ref = Reference(path)
        toks = np.random.default_rng(0).integers(0, m.config.vocab_size, 72)
        seq = []
        worst = 0.0
        for pos, t in enumerate(toks):
            l = m.forward(int(t), pos).copy()
            seq.append(l)
            worst = max(worst, float(np.abs(l - ref.forward(int(t), pos)).max()))
        out[f"{name}/{fm}/tokens"] = np.array(seq)
        out[f"{name}/{fm}/prefill"] = m.prefill(toks[:70]).copy()
        print(f"{name:18s} {fm:8s} max|ours-ref| {worst:.3g}")
np.savez(sys.argv[1], **out)
