"""Tokenizers, token caches and packed batches."""

from lmjax.data.batches import Batch, PackedDataset
from lmjax.data.corpus import (BUNDLED_DIR, TokenStream, bundled_corpus, load_token_stream,
                               read_documents)
from lmjax.data.tokenizer import SpecialTokens, Tokenizer, train_tokenizer

__all__ = ["BUNDLED_DIR", "Batch", "PackedDataset", "SpecialTokens", "TokenStream", "Tokenizer",
           "bundled_corpus", "load_token_stream", "read_documents", "train_tokenizer"]
