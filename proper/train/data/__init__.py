"""Multi-user data: LaMP-shaped JSONL records, user-id -> bank-row mapping, per-user
splits and batching for the trainer.

A data file holds one JSON object per line::

    {"user_id": "u17", "input": "opinion on books ?", "output": "like indeed", "timestamp": 3}

``user_id`` is a JSON integer or a non-empty string, ``input`` and ``output`` non-empty
strings; every other key is kept, unchanged, in the record's ``extra`` dict. Blank lines
are skipped. A malformed line raises :class:`DataError` naming the file, the 1-based line
number and what is wrong; the file is parsed whole before anything is built, so a failing
load returns and caches nothing.

User ids keep their JSON type: ``"1"`` and ``1`` are two different users (a file produced
by a tool that writes ids as strings stays consistent with itself; silently merging them
could mix two people's data). :class:`UserIndex` maps ids to the rows of the user bank.

Splits (:func:`split_by_user`) are per user: when every record carries a timestamp, each
user's history is ordered by time and the latest records go to test, the ones before them
to validation, so no future record is trained on; otherwise each user's records are
shuffled with a seed. Rules for short histories (n = the user's number of records)::

    n = 1   -> train 1
    n = 2   -> train 1, test 1
    n = 3   -> train 2, test 1
    n >= 4  -> test  = max(1, round(test * n)),
               val   = max(1, round(val * n)) but only while train keeps >= 2 records,
               train = the rest (always >= 1)

so every user with two or more records is evaluated (the sparse users the method is for),
and a user with a single record only trains. Fractions of 0 turn a part off.

Batches (:func:`collate`) are built for causal language models: ``[bos] prompt output
[eos]``, labels equal to the input ids on the output (and eos) tokens and -100 on the
prompt and padding, plus ``user_rows`` (one bank row per sequence, -1 for a user without
a row). Prompt and output are tokenised separately (no special tokens added by the
tokenizer), so generation from :func:`collate_prompts`' left-padded prompts sees exactly
the token sequence training saw.

The package splits by job: ``records`` (the format, ``Example``, ``Dataset``, files),
``users`` (``UserIndex``), ``splits`` (``split_by_user``) and ``batching`` (tokenising,
padding, collating, ``TrainerCollator``). Every public name is importable from here.
"""

from .batching import (
    Encoded,
    TrainerCollator,
    collate,
    collate_prompts,
    encode,
    pad_encoded,
    special_token_ids,
)
from .records import (
    REQUIRED,
    SPLIT_KEY,
    SPLIT_PARTS,
    TIME_KEY,
    DataError,
    Dataset,
    Example,
    UserId,
    load_jsonl,
    parse_timestamp,
    write_jsonl,
)
from .splits import Split, split_by_user
from .users import INDEX_FORMAT, INDEX_VERSION, UserIndex

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "REQUIRED",
    "SPLIT_KEY",
    "SPLIT_PARTS",
    "TIME_KEY",
    "DataError",
    "Dataset",
    "Encoded",
    "Example",
    "Split",
    "TrainerCollator",
    "UserId",
    "UserIndex",
    "collate",
    "collate_prompts",
    "encode",
    "load_jsonl",
    "pad_encoded",
    "parse_timestamp",
    "special_token_ids",
    "split_by_user",
    "write_jsonl",
]
