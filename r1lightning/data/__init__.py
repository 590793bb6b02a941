from r1lightning.data.chat import IGNORE_INDEX, encode_conversation, encode_prompt
from r1lightning.data.datamodules import PromptDataModule, TraceDataModule
from r1lightning.data.io import DataError, load_rows

__all__ = ["IGNORE_INDEX", "DataError", "PromptDataModule", "TraceDataModule", "encode_conversation", "encode_prompt", "load_rows"]
