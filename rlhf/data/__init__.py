"""Data: strict readers, record formats, tokenization with loss masks, pretraining cleaning."""

from rlhf.data.records import DataError

__all__ = ["DataError"]
