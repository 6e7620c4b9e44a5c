"""Tokenizer speed: sdtrt's CLIPTokenizer vs transformers' (the one diffusers loads), side by side.

    python -m benchmarks.tokenizer_speed [TOKENIZER_DIR]

Encodes a typical 60-token prompt to [1, 77] ids, warm (BPE caches filled), interleaved, best of rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("a watercolor painting of a fox in a snowy forest, highly detailed, golden hour, 4k, trending on artstation, "
          "masterpiece, by greg rutkowski and alphonse mucha, sharp focus, octane render, 8k uhd, dramatic lighting")


def _best(fn, rounds: int = 20, per_round: int = 200) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        best = min(best, (time.perf_counter() - t) / per_round)
    return best


def main(argv: list[str]) -> int:
    from transformers import CLIPTokenizer as Reference

    from sdtrt.models.presets import write_tokenizer
    from sdtrt.runtime.text.tokenizer import CLIPTokenizer

    folder = Path(argv[0]) if argv else Path(tempfile.mkdtemp()) / "tokenizer"
    if not argv:
        write_tokenizer(folder, "<|endoftext|>")
    ours, ref = CLIPTokenizer.from_dir(folder), Reference.from_pretrained(folder)
    assert ours.encode(PROMPT)[0].tolist() == ref(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    ours_s = _best(lambda: ours.encode(PROMPT))
    ref_s = _best(lambda: ref(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt"))
    print(f"tokens: {len(ours.token_ids(PROMPT))}; sdtrt {ours_s * 1e3:.3f} ms, transformers {ref_s * 1e3:.3f} ms "
          f"per encode ({ref_s / ours_s:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
