"""Per-head follow-up on a decompose run (experiments/decompose/README.md §2): single last-layer head
ablations, each head's cosine as a detector, Decomp-Rep at other cosine thresholds.
    PYTHONPATH=src python experiments/decompose/per_head.py   (edit RUN/OVERRIDES below)
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # compose_cfg
RUN, OVERRIDES = "/tmp/i14/ft_final", ["attack.poison_rate=0.3"]
import torch, numpy as np
from conftest import compose_cfg
from clipbd.models import factory
from clipbd.registry import build_attack
from clipbd.data.sources import class_names, prompt_fn, heldout_shards
from clipbd.models.zeroshot import class_embeddings
from clipbd.data.loader import ShardDataset, make_loader
from clipbd.data.shards import build_index
from clipbd.inspect.analysis import decompose_images, split_validation
from clipbd.inspect.ablation import outcome
from clipbd.inspect.heads import prototypes, infected, repair
from clipbd.metrics import detection_metrics
from clipbd.utils import derive_seed, rng
cfg = compose_cfg(OVERRIDES, run_dir=RUN)
b = factory.create_trained(cfg); classes = class_names(cfg); p = prompt_fn(cfg)
ce = class_embeddings(b.model, b.tokenizer, [p(c, n=64, seed=derive_seed(0, "zeroshot") % 2**31) for c in classes])
shards = heldout_shards(cfg); ds = ShardDataset(build_index(shards, progress=False), range(len(shards)), b.to_tensor(), label_key="label")
labels = []
def bat(lab=None):
    for x in make_loader(ds, 256):
        if lab is not None: lab.append(x["label"])
        yield x["image"]
clean = decompose_images(b.model, bat(labels), b.normalize)
labels = torch.cat(labels).numpy()
fn, target = next(iter(build_attack(cfg).test_triggers().values()))
bd = decompose_images(b.model, bat(), b.normalize, fn)
vi, ti = split_validation(len(labels), 0.2, rng(0, "decompose/val"))
val, c, t = clean.take(vi), clean.take(ti), bd.take(ti); y = labels[ti]; T = classes.index(target)
proto = prototypes(val); L, H = 4, 4
for h in range(H):
    m = torch.zeros(1, L, H, dtype=torch.bool); m[0, 3, h] = True
    print("mean-ablate head 3.%d for all:" % h, {k: round(v, 3) for k, v in outcome(repair(c, m.expand(len(ti), -1, -1), proto), repair(t, m.expand(len(ti), -1, -1), proto), ce, y, T).items()})
m = torch.zeros(1, L, H, dtype=torch.bool); m[0, 3, :] = True
print("all layer-3 heads:", {k: round(v,3) for k,v in outcome(repair(c, m.expand(len(ti),-1,-1), proto), repair(t, m.expand(len(ti),-1,-1), proto), ce, y, T).items()})
ib, ic = infected(t, proto), infected(c, proto)
yy = np.r_[np.ones(len(ti)), np.zeros(len(ti))]
for h in range(H):
    print("Det by -cos of head 3.%d:" % h, {k: round(v,3) for k,v in detection_metrics(yy, -np.r_[ib["cos"][:,3,h].numpy(), ic["cos"][:,3,h].numpy()]).items()})
# Rep where the infected mask is 'any of layer 3 by cosine <= 0.5'
for e in (0.0, 0.25, 0.5):
    mb = (ib["cos"] <= e); mc = (ic["cos"] <= e); keep = torch.zeros(L, dtype=torch.bool); keep[3] = True
    mb &= keep[None,:,None]; mc &= keep[None,:,None]
    print("Rep cos<=%.2f layer 3:" % e, {k: round(v,3) for k,v in outcome(repair(c, mc, proto), repair(t, mb, proto), ce, y, T).items()})
