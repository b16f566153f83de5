"""Training data: raw text packed into a token stream (pipeline.py), and instruction data
(prompt/completion, chat messages) with loss masks and boundary-respecting packing (sft.py)."""

from .pipeline import PackedDataset, builtin_corpus_path, read_documents
from .sft import Batch, SftDataset, SftSettings, build_sequences, load_sft_dataset
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "Batch", "ByteTokenizer", "PackedDataset", "SftDataset", "SftSettings", "build_sequences", "builtin_corpus_path",
    "load_sft_dataset", "load_tokenizer", "read_documents",
]
