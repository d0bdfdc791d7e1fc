"""Coconut against another framework: the n+1-pass algorithm written from the paper's description on
`transformers`' GPT2LMHeadModel / LlamaForCausalLM (tiny random, eval mode, f32) — pass j replaces every row's j-th
thought embedding by the last hidden state (after the final norm) of the position before it, then one last pass
gives the logits — against our compiled latent loop (`latent.loss_fn`): loss and every gradient, <= 1e-5."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from latent_jax.hf import load_hf, save_hf  # noqa: E402
from latent_jax.latent import loss_fn  # noqa: E402
from latent_jax.methods import IGNORE, Example, collate  # noqa: E402
from latent_jax.testing import make_hf_checkpoint  # noqa: E402


def _examples(vocab: int, seed: int = 0) -> list[Example]:
    """Rows with different question lengths and 2, 1, 0 thoughts; loss on the text after the thoughts."""
    rng = np.random.default_rng(seed)
    out = []
    for q, n, rest in ((5, 2, 6), (8, 1, 4), (3, 2, 7), (6, 0, 5)):
        toks = rng.integers(2, vocab, q + n + rest).tolist()
        labels = [IGNORE] * (q + n) + toks[q + n:]
        out.append(Example(toks, labels, latent_start=q, n_latent=n))
    return out


def _torch_coconut_loss(model, batch):
    ids = torch.tensor(batch.tokens, dtype=torch.long)
    mask = torch.tensor(batch.mask)
    pos = torch.tensor(np.where(batch.mask, np.cumsum(batch.mask, axis=1) - 1, 0), dtype=torch.long)
    latent = [np.flatnonzero(row).tolist() for row in batch.latent]
    embeds = model.get_input_embeddings()(ids)
    for j in range(max(map(len, latent))):  # pass j fills thought j of every row that has one
        hidden = model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos,
                       output_hidden_states=True).hidden_states[-1]
        rows = [b for b, lp in enumerate(latent) if len(lp) > j]
        cols = [latent[b][j] for b in rows]
        fill = torch.zeros_like(embeds)
        keep = torch.ones(embeds.shape[:2] + (1,))
        for b, c in zip(rows, cols):
            fill[b, c] = hidden[b, c - 1]
            keep[b, c] = 0
        embeds = embeds * keep + fill
    logits = model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos).logits
    labels = torch.tensor(batch.labels, dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_coconut_loss_and_grads_match_transformers(tmp_path, name):
    folder = make_hf_checkpoint(tmp_path / name, name)
    cfg, graphdef, params = load_hf(folder)
    batch = collate(_examples(cfg.vocab_size), 0, bucket=4)
    assert batch.n_latent == 2 and batch.prefix_len > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    loss_t = _torch_coconut_loss(model, batch)
    loss_t.backward()
    grads_t = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    arrays = {k: jax.numpy.asarray(v) for k, v in batch.arrays().items()}
    (loss_j, _), grads_j = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, graphdef, arrays, batch.prefix_len, batch.n_latent), has_aux=True))(params)
    lt = float(loss_t.detach())
    assert abs(float(loss_j) - lt) <= 1e-5 * max(1.0, abs(lt))
    ours = load_file(str(save_hf(tmp_path / "grads", cfg, grads_j) / "model.safetensors"))  # HF names
    prefix = "transformer." if name == "gpt2" else ""
    checked = 0
    for n, g in grads_t.items():
        key = n if n in ours else n[len(prefix):] if n.startswith(prefix) and n[len(prefix):] in ours else None
        if key is None:
            continue  # the tied lm_head (its gradient is in the embedding's)
        np.testing.assert_allclose(ours[key], g, atol=1e-5, rtol=1e-4, err_msg=n)
        checked += 1
    assert checked >= len(ours) - 1


GPT2_SITES = ("embd_pdrop", "resid_pdrop", "attn_pdrop")


@pytest.mark.parametrize("name,site", [("gpt2", s) for s in GPT2_SITES] + [("llama", "attention_dropout")])
def test_dropout_sites_match_transformers_in_train_mode(tmp_path, name, site):
    """Where dropout acts: one site at rate 1 (deterministic in both frameworks: everything it touches is zeroed),
    the others at 0, `transformers` in train mode (eager attention) against our forward with a dropout key. The
    rates come from config.json (`load_hf`) and go back into it (`save_hf`)."""
    rates = {s: 0.0 for s in GPT2_SITES} if name == "gpt2" else {}
    folder = make_hf_checkpoint(tmp_path / name, name, seed=3, **{**rates, site: 1.0})
    cfg, graphdef, params = load_hf(folder)
    ours_name = {"embd_pdrop": "embd_dropout", "resid_pdrop": "resid_dropout", "attn_pdrop": "attn_dropout",
                 "attention_dropout": "attn_dropout"}[site]
    assert getattr(cfg, ours_name) == 1.0 and sum(getattr(cfg, n) for n in
                                                   ("embd_dropout", "resid_dropout", "attn_dropout")) == 1.0
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 9))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                              attn_implementation="eager").train()
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    from latent_jax.models import forward

    got = np.asarray(forward(graphdef, params, tokens=tokens, dropout_rng=jax.random.PRNGKey(0)).logits)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    plain = np.asarray(forward(graphdef, params, tokens=tokens).logits)  # evaluation: no dropout
    assert np.abs(plain - ref).max() > 1e-3
    import json

    saved = json.loads((save_hf(tmp_path / "out", cfg, params) / "config.json").read_text())
    assert saved[site] == 1.0
