"""Training data: reading text/JSONL, tokenising, packing into fixed-length sequences."""

from .pipeline import ByteTokenizer, PackedDataset, builtin_corpus_path, load_tokenizer, read_documents

__all__ = ["ByteTokenizer", "PackedDataset", "builtin_corpus_path", "load_tokenizer", "read_documents"]
