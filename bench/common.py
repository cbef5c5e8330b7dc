"""Shared pieces of the bench scripts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nvlm_jax.processing import tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Standard tokenizer file names -> the release's copies in NVLM_REFERENCE_DIR.
RELEASE_FILES = {
    "vocab.json": "nvlm_d_72b_vocab.json",
    "merges.txt": "nvlm_d_72b_merges.txt",
    "tokenizer_config.json": "nvlm_d_72b_tokenizer_config.json",
}


def bench_tokenizer(tmp: Path):
    """(tokenizer, name): the release's Qwen2 tokenizer when its files are in NVLM_REFERENCE_DIR
    (default ../shared/reference), else the tiny test tokenizer built in `tmp`."""
    ref = Path(os.environ.get("NVLM_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
    if all((ref / src).is_file() for src in RELEASE_FILES.values()):
        folder = tmp / "release_tokenizer"
        folder.mkdir()
        for dst, src in RELEASE_FILES.items():
            shutil.copyfile(ref / src, folder / dst)
        return tokenizer.load_tokenizer(folder), "release Qwen2 (151,665 tokens)"
    return tokenizer.load_tokenizer(tokenizer.make_tiny_tokenizer(tmp / "tiny")), "tiny test"
