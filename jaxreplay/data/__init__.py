"""Data: tokenizer training, corpora, token files and the grain loader."""

from jaxreplay.errors import DataError

from .commands import build_default_corpora, resolve_path
from .loader import EvalBatches, TrainBatches, eval_batches
from .tokenfile import TokenDir, open_token_dir, write_token_dir
from .tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

__all__ = ["DataError", "EvalBatches", "TokenDir", "TrainBatches", "build_default_corpora", "eval_batches",
           "load_tokenizer", "open_token_dir", "resolve_path", "tokenizer_hash", "train_tokenizer",
           "write_token_dir"]
