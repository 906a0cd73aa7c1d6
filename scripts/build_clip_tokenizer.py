#!/usr/bin/env python3
"""One-off: rebuild CLIP's BPE tokenizer files (vocab.json, merges.txt) the OpenAI way from the
MIT-licensed `bpe_simple_vocab_16e6.txt.gz` that the open_clip_torch wheel ships.

    pip download --no-deps open_clip_torch && unzip -j open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz
    python scripts/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz diffusionapi/configs/clip-tokenizer
"""
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusionapi.demo import _bytes_to_unicode  # noqa: E402


def main(src: str, out: str) -> None:
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) == 48894 and len(vocab) == 49408
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
