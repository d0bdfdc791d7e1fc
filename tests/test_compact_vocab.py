import pytest

from latent_jax.compact_vocab import CompactTokenizer, load_any_tokenizer
from latent_jax.tokenizer import load_tokenizer


def test_compact_round_trip_specials_and_save(tmp_path):
    base = load_tokenizer("gpt2")
    texts = ["Every wumpus is a yumpus.", "Alex is a wumpus.\n### Alex is a yumpus."]
    tok = CompactTokenizer.from_texts(base, texts)
    assert tok.vocab_size < 30 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    bot, lat = tok.add_special_tokens(["<|start-latent|>", "<|latent|>"])
    assert (bot, lat) == (tok.vocab_size - 2, tok.vocab_size - 1)
    s = "Alex is a wumpus.\n<|start-latent|><|latent|><|latent|>### Alex is a yumpus."
    ids = tok.encode(s)
    assert ids.count(lat) == 2 and max(ids) < tok.vocab_size and tok.decode(ids) == s
    assert tok.decode(ids, skip_special=True) == s.replace("<|start-latent|>", "").replace("<|latent|>", "")
    # same text as the base tokenizer, different (dense) ids
    plain = "Every wumpus is a yumpus."
    assert tok.decode(tok.encode(plain)) == base.decode(base.encode(plain))
    tok.save(tmp_path)
    again = load_any_tokenizer(tmp_path)
    assert again.encode(s) == ids and again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not in the compact vocabulary"):
        tok.encode("Zebra quantum")
