"""Token Assorted (Su et al., ICML 2025): the leftmost CoT tokens replaced by discrete latent codes of a VQ-VAE.

A VQ-VAE (`latent_jax.methods.vqvae`) maps every chunk of L CoT tokens to one of K codes. The vocabulary grows by
the K code tokens `<|latent_i|>` and the markers `<|boLatent|>` / `<|eoLatent|>`. A training example replaces its
leftmost m = k·L CoT tokens by their k codes, k drawn per example and epoch (`example_stage`, deterministic in
seed, epoch, record index) uniformly from the allowed counts (0 .. #full chunks, or the fitting `m_choices`):

    question\\n <|boLatent|> <|latent_c1|> .. <|latent_ck|> <|eoLatent|> CoT[k·L:] ### answer <eos>     (k > 0)
    question\\n CoT ### answer <eos>                                                                     (k = 0)

Labels cover everything after the question, codes and markers included: at inference the model decides itself
whether to open a latent span and which codes to write (plain greedy decoding; the codes are ordinary tokens).
One stage, no curriculum. The "stage" given to `encode` is k (clipped to the record's full chunks).
`prepare_data` loads the VQ-VAE (`vqvae_dir`, else `{output_dir}/vqvae` if present) or trains it on the training
CoTs and saves it to `{output_dir}/vqvae`, then caches every record's codes (keyed by a hash of question + steps).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from latent_jax.layout import IGNORE, Example, Prompt
from latent_jax.methods.base import Method, first_token_id
from latent_jax.tokenizer import Tokenizer
from latent_jax.methods.vqvae import (CONFIG_FILE, VQVAE, ChunkData, VQVAEConfig, load_vqvae, save_vqvae,
                              tokenizer_fingerprint, train_vqvae)

log = logging.getLogger(__name__)
BOL, EOL = "<|boLatent|>", "<|eoLatent|>"


def code_token(i: int) -> str:
    return f"<|latent_{i}|>"


@dataclasses.dataclass(frozen=True)
class TokenAssortedConfig:
    """vqvae: VQ-VAE options (a mapping, see `vqvae.VQVAEConfig`: codebook_size, chunk_len, beta, codebook_update,
    decay, steps, ...). vqvae_dir: a trained VQ-VAE folder to load. m_choices: allowed numbers of replaced CoT
    tokens (multiples of chunk_len; default: every multiple up to the CoT length). init_token: new token rows copy
    this token's embedding when a pretrained model is resized (default None: N(0, 0.02), distinct codes)."""

    vqvae: Any = dataclasses.field(default_factory=VQVAEConfig)
    vqvae_dir: str | None = None
    m_choices: tuple[int, ...] | None = None
    init_token: str | None = None

    def __post_init__(self):
        vq = self.vqvae
        if isinstance(vq, Mapping):
            vq = VQVAEConfig.from_dict(dict(vq))
        elif not isinstance(vq, VQVAEConfig):
            raise ValueError(f"token_assorted vqvae must be a mapping of VQ-VAE options, got {vq!r}")
        object.__setattr__(self, "vqvae", vq)
        if self.m_choices is not None:
            mc = self.m_choices
            L = vq.chunk_len
            if (not isinstance(mc, (list, tuple)) or not mc
                    or any(isinstance(m, bool) or not isinstance(m, int) or m < 0 or m % L for m in mc)):
                raise ValueError(f"m_choices={mc!r}: must be a non-empty list of non-negative multiples of"
                                 f" vqvae.chunk_len={L}")
            object.__setattr__(self, "m_choices", tuple(sorted(set(mc))))


class TokenAssorted(Method):
    name = "token_assorted"

    def __init__(self, tokenizer: Tokenizer, cfg: TokenAssortedConfig = TokenAssortedConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.text_vocab = tokenizer.vocab_size  # the VQ-VAE sees text tokens only
        K = cfg.vqvae.codebook_size
        self.special_tokens = (BOL, EOL, *(code_token(i) for i in range(K)))
        ids = tokenizer.add_special_tokens(list(self.special_tokens))
        self.bol_id, self.eol_id, self.code_ids = ids[0], ids[1], ids[2:]
        self.vqvae: VQVAE | None = None
        self._codes: dict[str, tuple[int, ...]] = {}

    def num_stages(self) -> int:
        return 1

    def schedule(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        return 0  # one stage: the optimizer is never reset

    def _parts(self, record: dict[str, Any]):
        """(question, CoT, answer) token lists (`Method.record_tokens`)."""
        t = self.record_tokens(record)
        return t.question, t.cot, t.answer

    def allowed_chunks(self, record: dict[str, Any]) -> list[int]:
        """Numbers k of leading chunks that may be replaced (m = k·L <= CoT length, m in m_choices if set)."""
        L = self.cfg.vqvae.chunk_len
        n = len(self._parts(record)[1]) // L
        if self.cfg.m_choices is None:
            return list(range(n + 1))
        return [m // L for m in self.cfg.m_choices if m // L <= n] or [0]

    def example_stage(self, record: dict[str, Any], index: int, epoch: int, stage: int, seed: int,
                      uniform_prob: float) -> int:
        """k for this example and epoch: a uniform draw from `allowed_chunks`, deterministic in its arguments."""
        rng = np.random.default_rng([seed, epoch, index, 0x7A55])
        return int(rng.choice(self.allowed_chunks(record)))

    @staticmethod
    def record_key(record: dict[str, Any]) -> str:
        return hashlib.sha1((record["question"] + "\x1f" + "\x1e".join(record["steps"])).encode()).hexdigest()

    # --- VQ-VAE ------------------------------------------------------------------------------------------------

    def chunk_data(self, records: Sequence[dict[str, Any]]) -> ChunkData:
        return ChunkData.build([self._parts(r)[:2] for r in records], self.cfg.vqvae.chunk_len)

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = tokenizer_fingerprint(self.tok, self.text_vocab)
        return self._fingerprint

    def fit_vqvae(self, train_records: Sequence[dict[str, Any]], folder, progress: bool = True) -> VQVAE:
        """Train the VQ-VAE on the records' CoT chunks, save it to `folder`, use it for the codes."""
        vq = train_vqvae(self.cfg.vqvae, self.chunk_data(train_records), self.text_vocab, progress=progress)
        vq.meta["tokenizer"] = self.fingerprint()
        vq.meta["text_vocab"] = self.text_vocab
        save_vqvae(vq, folder)
        m = vq.meta["metrics"]["after"]
        log.info("VQ-VAE saved to %s: recon accuracy %.3f, codes used %d/%d (dead %d), perplexity %.1f", folder,
                 m["recon_accuracy"], m["codes_used"], self.cfg.vqvae.codebook_size, m["dead_codes"],
                 m["perplexity"])
        self.vqvae, self._codes = vq, {}
        return vq

    def load_vqvae(self, folder) -> VQVAE:
        """Load a VQ-VAE folder; it must fit this tokenizer, codebook size and chunk length."""
        vq = load_vqvae(folder)
        want, got = self.cfg.vqvae, vq.cfg
        diff = [f"{k}: saved {getattr(got, k)!r}, config {getattr(want, k)!r}" for k in ("codebook_size", "chunk_len")
                if getattr(got, k) != getattr(want, k)]
        if vq.meta.get("tokenizer") != self.fingerprint():
            diff.append("tokenizer: trained with another tokenizer / vocabulary")
        if diff:
            raise ValueError(f"VQ-VAE in {folder} does not fit this token_assorted config ({'; '.join(diff)})")
        self.vqvae, self._codes = vq, {}
        return vq

    def fit_auxiliary(self, train_records: Sequence[dict[str, Any]], folder) -> dict[str, Any]:
        return self.fit_vqvae(train_records, folder).meta["metrics"]

    def prepare_data(self, train_records: Sequence[dict[str, Any]], output_dir) -> None:
        """Load (vqvae_dir, else an existing {output_dir}/vqvae) or train + save the VQ-VAE; cache the codes."""
        out = pathlib.Path(output_dir) / "vqvae"
        given = pathlib.Path(self.cfg.vqvae_dir) if self.cfg.vqvae_dir else None
        if given is not None and (given / CONFIG_FILE).is_file():
            self.load_vqvae(given)
        elif (out / CONFIG_FILE).is_file():
            self.load_vqvae(out)
            same = lambda c: dataclasses.replace(c, log_every=1)  # noqa: E731  (logging does not matter)
            if same(self.vqvae.cfg) != same(self.cfg.vqvae):
                raise ValueError(f"{out} holds a VQ-VAE trained with other options ({self.vqvae.cfg}); delete it,"
                                 " or set method.vqvae_dir to use it")
        else:
            if given is not None:
                log.warning("vqvae_dir %s holds no VQ-VAE: training one, saved to %s", given, out)
            self.fit_vqvae(train_records, out)
        self.cache_codes(train_records)

    def cache_codes(self, records: Sequence[dict[str, Any]]) -> None:
        """Codes of every full chunk of every record (batched through the jitted encoder)."""
        if self.vqvae is None:
            raise ValueError("token_assorted: no VQ-VAE; call prepare_data(train_records, output_dir) first")
        todo = {self.record_key(r): r for r in records if self.record_key(r) not in self._codes}
        if not todo:
            return
        data = self.chunk_data(list(todo.values()))
        codes = self.vqvae.codes(data.chunks) if len(data) else np.zeros((0,), np.int32)
        per = np.bincount(data.chunk_prompt, minlength=len(todo))
        for key, part in zip(todo, np.split(codes, np.cumsum(per)[:-1])):
            self._codes[key] = tuple(int(c) for c in part)

    def codes(self, record: dict[str, Any]) -> tuple[int, ...]:
        key = self.record_key(record)
        if key not in self._codes:
            if self.vqvae is None:
                raise ValueError(f"token_assorted: no VQ-VAE codes for record {record['question'][:80]!r}...: call"
                                 " prepare_data(train_records, output_dir) first")
            self.cache_codes([record])
        return self._codes[key]

    # --- layout ------------------------------------------------------------------------------------------------

    def encode(self, record: dict[str, Any], stage: int) -> Example:
        """The example with its first k = min(stage, #full chunks) chunks replaced by their codes."""
        q, cot, a = self._parts(record)
        L = self.cfg.vqvae.chunk_len
        k = max(0, min(int(stage), len(cot) // L))
        latent = [self.bol_id, *(self.code_ids[c] for c in self.codes(record)[:k]), self.eol_id] if k else []
        rest = latent + cot[k * L:] + a
        return Example(q + rest, [IGNORE] * len(q) + rest, latent_start=len(q), n_latent=0)

    def prompt(self, record: dict[str, Any], stage: int) -> Prompt:
        return Prompt(self._parts(record)[0])

    def init_token_id(self) -> int | None:
        """None: `prepare_model` gives the new rows N(0, 0.02) (see TokenAssortedConfig.init_token)."""
        if self.cfg.init_token is None:
            return None
        return first_token_id(self.tok, self.cfg.init_token)
