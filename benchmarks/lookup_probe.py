"""Does a 2-layer model trained from scratch learn to look edges up? A teacher-forced CoT probe on symbolic ProsQA.

    python benchmarks/lookup_probe.py RUNG BATCH LR STEPS [sep=none] [model overrides, e.g. smear_keys=1 family=llama]

Trains CoT (`train_step`, AdamW, constant lr) on fresh generated questions of RUNG every step and, every 100 steps,
prints teacher-forced accuracy at each supervised position (0: first path node, 1: its newline, 2: second node, ...)
and child0 / child2: the share of predictions at positions 0 / 2 that are a child of the current path node (a
model that looks the current node's edges up scores ~1 there; deg0 / deg2: the mean out-degree of that node).
sep=none: the path's nodes follow each other (`data.step_separator: none`, the lab's layout since session 10); then
slot 1 is the second path node. Curves: results/investigate/lookup_probe.json (BUILD_NOTES, issue 15).
"""
import sys, time, json
import numpy as np, jax, jax.numpy as jnp
from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.methods import build_method, collate
from latent_jax.models import init_model, forward
from latent_jax.testing import tiny_config
from latent_jax.train.step import TrainState, train_step
from latent_jax.word_tokenizer import WordTokenizer

rung = sys.argv[1]; B = int(sys.argv[2]); lr = float(sys.argv[3]); steps = int(sys.argv[4])
over = dict(a.split("=") for a in sys.argv[5:])
over = {k: (float(v) if "." in v else int(v)) if v.replace(".", "").isdigit() else v for k, v in over.items()}
method_name = over.pop("method", "cot")
nosep = over.pop("sep", "newline") == "none"  # data.step_separator=none: path nodes with no newline between them
NODE_SLOT = {0: 0, 2: 1} if nosep else {0: 0, 2: 2}  # reported slot -> label slot of path node 1 / 2
tok = WordTokenizer(symbolic_vocab(), newlines=not nosep)
method = build_method(method_name, tok)
mc = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=512, max_positions=256)
mc.update(over)
family = mc.pop("family", "gpt2")
cfg = tiny_config(family, vocab_size=tok.vocab_size, **mc)
graphdef, params = init_model(cfg, seed=0)
state = TrainState.create(graphdef, params, lr=lr, weight_decay=0.01, grad_clip=1.0)
test = symbolic_records(generate_prosqa(256, seed=999, rung=rung), "gen")
tex = [method.encode(r, stage=0) for r in test]
tb = collate(tex, tok.pad_id, bucket=16)

@jax.jit
def pred(params, tokens, mask):
    return jnp.argmax(forward(graphdef, params, tokens=tokens, mask=mask).logits, -1)

def evaluate(params):
    p = np.asarray(pred(params, tb.tokens, tb.mask))
    lab = np.asarray(tb.labels)
    acc_by_slot = {}
    for i, r in enumerate(test):
        pos = np.nonzero(lab[i] != -100)[0]
        for j, q in enumerate(pos):
            ok = p[i, q - 1] == lab[i, q]
            acc_by_slot.setdefault(j, []).append(ok)
    out = {k: round(float(np.mean(v)), 3) for k, v in sorted(acc_by_slot.items())[:9]}
    # is the predicted node a child of the current node (teacher-forced)? and is it on ANY path to the target?
    child, cand = {0: [], 2: []}, {0: [], 2: []}
    for i, r in enumerate(test):
        sym = r["idx_to_symbol"]; kids = {}
        for s_, t_ in r["edges"]:
            kids.setdefault(sym[s_], set()).add(sym[t_])
        path = [sym[r["root"]]] + r["steps"]
        pos = np.nonzero(lab[i] != -100)[0]
        for slot in (0, 2):
            if slot // 2 + 1 < len(path) and NODE_SLOT[slot] < len(pos):
                cur = path[slot // 2]
                guess = tok.decode([int(p[i, pos[NODE_SLOT[slot]] - 1])]).strip()
                child[slot].append(guess in kids.get(cur, set()))
                cand[slot].append(len(kids.get(cur, set())))
    out["child0"] = round(float(np.mean(child[0])), 3); out["child2"] = round(float(np.mean(child[2])), 3)
    out["deg0"] = round(float(np.mean(cand[0])), 2); out["deg2"] = round(float(np.mean(cand[2])), 2)
    return out

t0 = time.time(); seen = 0
for s in range(steps):
    recs = symbolic_records(generate_prosqa(B, seed=1000 + s, rung=rung), "gen")
    batch = collate([method.encode(r, stage=0) for r in recs], tok.pad_id, bucket=16)
    state, m = train_step(state, batch)
    seen += B
    if s % 100 == 0 or s == steps - 1:
        print(json.dumps(dict(step=s, seen=seen, t=round(time.time() - t0), loss=round(float(m["loss"]), 3), acc=evaluate(state.params))), flush=True)
