"""Tokenizers, corpus readers, token stores and packed batches."""

from lmjax.data.batches import Batch, PackedDataset
from lmjax.data.corpus import BUNDLED_DIR, bundled_corpus, open_corpus
from lmjax.data.readers import expand_inputs, read_documents
from lmjax.data.store import TokenSource, TokenStore, TokenStream
from lmjax.data.special import SpecialTokens
from lmjax.data.tokenizer import Tokenizer, train_tokenizer
from lmjax.data.tokenizer_io import load_tokenizer

__all__ = ["BUNDLED_DIR", "Batch", "PackedDataset", "SpecialTokens",
           "TokenSource", "TokenStore", "TokenStream", "Tokenizer", "bundled_corpus",
           "expand_inputs", "load_tokenizer", "open_corpus", "read_documents",
           "train_tokenizer"]
