"""docs/adding_a_method.md: its one-file method runs as written. The doc's code block is executed, the method is
registered, built by name, its layout checked, trained by the trainer (the loss falls) and evaluated through the
base class's default generation (the shared latent loop)."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from latent_jax.data import generate_prosqa, symbolic_records, symbolic_vocab
from latent_jax.evaluate import evaluate
from latent_jax.layout import IGNORE
from latent_jax.methods import available_methods, build_method, prepare_model, register_method
from latent_jax.methods.base import Method
from latent_jax.models import get_config, init_model
from latent_jax.testing import quiet, tiny_config
from latent_jax.train.trainer import train
from latent_jax.word_tokenizer import WordTokenizer

DOC = pathlib.Path(__file__).parents[1] / "docs" / "adding_a_method.md"


@pytest.fixture(scope="module")
def doc_namespace():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1 and "register_method(" in blocks[0]
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    return ns


def test_the_documented_method_registers_encodes_trains_and_evaluates(doc_namespace):
    assert "fixed_thoughts" in available_methods()
    tok = WordTokenizer(symbolic_vocab())
    m = build_method("fixed_thoughts", tok, n_thoughts=2)
    assert isinstance(m, doc_namespace["FixedThoughts"]) and isinstance(m, Method)
    records = symbolic_records(generate_prosqa(32, seed=5, rung="tiny"), "generated")
    ex = m.encode(records[0], 0)
    answer = tok.encode("### " + records[0]["answer"]) + [tok.eos_id]
    assert ex.n_latent == 2 and ex.tokens[ex.latent_start:ex.latent_start + 2] == [m.thought] * 2
    assert [t for t in ex.labels if t != IGNORE] == answer and ex.tokens[-len(answer):] == answer
    p = m.prompt(records[0], 0)
    assert p.n_latent == 2 and p.prefix[-1] == m.bot and p.suffix == [m.eot]
    with pytest.raises(ValueError, match="n_thoughts"):
        build_method("fixed_thoughts", tok, n_thoughts=0)

    cfg = tiny_config("gpt2", vocab_size=len(symbolic_vocab()))
    graphdef, params = init_model(cfg, seed=0)
    _, graphdef, params = prepare_model(m, cfg, graphdef, params)  # rows for <bot> <thought> <eot>
    assert get_config(graphdef, params).vocab_size == tok.vocab_size
    r = train(m, records, graphdef, params, quiet(epochs=3, batch_size=16, lr=3e-3))
    losses = [h["train_loss"] for h in r.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2
    res = evaluate(m, records[:8], graphdef, r.params, stage=0, batch_size=8, max_new_tokens=4, progress=False)
    assert res["method"] == "fixed_thoughts" and res["n"] == 8 and len(res["examples"]) == 3
    assert all(e["generated"].startswith("###") for e in res["examples"])  # it learned the answer format
    assert np.isfinite(res["mean_generated_tokens"])


def test_register_method_refuses_builtin_names_and_non_methods(doc_namespace):
    with pytest.raises(ValueError, match="built in"):
        register_method("coconut", doc_namespace["FixedThoughts"], doc_namespace["FixedThoughtsConfig"])
    with pytest.raises(TypeError, match="Method"):
        register_method("plain", object, doc_namespace["FixedThoughtsConfig"])
    with pytest.raises(ValueError, match="unknown method 'nope'.*fixed_thoughts"):
        build_method("nope", WordTokenizer(symbolic_vocab()))
