"""Token ids for the text encoders of `--refine`'s conditioning.

- an encoder from a pipeline folder that ships its tokenizer: that tokenizer, on the prompts;
- a CLIP encoder with CLIP's 49408-token vocabulary (CLIP-L, OpenCLIP-H/-G, wherever they come
  from): CLIP's own byte-pair vocabulary, shipped with prolora (data/bpe_simple_vocab_16e6.txt.gz,
  OpenAI's file, MIT licence: data/LICENSE-CLIP-BPE), through transformers' CLIPTokenizer;
- otherwise (a T5 without its SentencePiece model, an encoder with another vocabulary): random
  token ids fed through the real encoder, which keeps its output statistics: a start token,
  4..32 ids drawn uniformly from the ordinary vocabulary, the end token, padding to the length.
"""
from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

import torch

from .textenc import Encoder

BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers' CLIPTokenizer on the shipped vocabulary (vocab.json and merges.txt written
    once into a temporary folder, as the tokenizer reads them)."""
    from transformers import CLIPTokenizer

    lines = gzip.open(BPE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="prolora-clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def has_tokenizer(enc: Encoder) -> bool:
    """Whether `enc`'s prompts can be tokenized (without building the tokenizer)."""
    return enc.tokenizer_dir is not None or (enc.family == "clip" and enc.facts.get("vocab") == CLIP_VOCAB)


def tokenizer_for(enc: Encoder):
    """(tokenizer or None, how the ids are made: for the report)."""
    if enc.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(enc.tokenizer_dir, local_files_only=True), \
            f"its tokenizer ({enc.tokenizer_dir.parent.name}/{enc.tokenizer_dir.name})"
    if enc.family == "clip" and enc.facts.get("vocab") == CLIP_VOCAB:
        return clip_tokenizer(), "CLIP's BPE vocabulary (shipped with prolora)"
    return None, f"random token ids (no tokenizer for its {enc.facts.get('vocab')}-token vocabulary)"


def length_of(enc: Encoder, tokens: int) -> int:
    """Sequence length fed to `enc`: a CLIP's positions (77), `tokens` for a T5."""
    return int(enc.facts.get("positions") or 77) if enc.family == "clip" else int(tokens)


def random_ids(enc: Encoder, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] random prompts as ids: start (CLIP), 4..32 ordinary ids, end, padding. CLIP's
    start and end are the last two ids of its vocabulary and it pads with the end token; T5 ends
    with 1 and pads with 0. The same seed gives the same ids for every encoder of one vocabulary."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(enc.facts.get("vocab") or CLIP_VOCAB)
    clip = enc.family == "clip"
    start, end, pad, low, high = (vocab - 2, vocab - 1, vocab - 1, 0, vocab - 2) if clip else (None, 1, 0, 2, vocab)
    ids = torch.full((n, length), pad, dtype=torch.long)
    room = length - 2 if clip else length - 1
    for i in range(n):
        k = int(torch.randint(min(4, room), min(32, room) + 1, (1,), generator=g))
        body = torch.randint(low, high, (k,), generator=g)
        seq = ([start] if clip else []) + body.tolist() + [end]
        ids[i, :len(seq)] = torch.tensor(seq)
    return ids


def prompt_ids(tok, prompts: list[str], length: int) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


__all__ = ["clip_tokenizer", "has_tokenizer", "length_of", "prompt_ids", "random_ids", "tokenizer_for"]
