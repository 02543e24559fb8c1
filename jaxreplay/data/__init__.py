"""Data: tokenizer training, corpora, token files and the grain loader."""

from jaxreplay.errors import DataError

from .loader import EvalBatches, TrainBatches, eval_batches
from .tokenfile import TokenDir, open_token_dir, write_token_dir
from .tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

# The commands (`jaxreplay data`, the default corpora, resolve_path) live in data.commands, which imports this
# package; re-exporting them here would close an import circle.
__all__ = ["DataError", "EvalBatches", "TokenDir", "TrainBatches", "eval_batches", "load_tokenizer",
           "open_token_dir", "tokenizer_hash", "train_tokenizer", "write_token_dir"]
