"""Which names hold secrets: one definition for what the launch keeps out of ``.deepspeed_env``
and what a run masks in its files and logs (``dtp_ds.train.redact``). Standard library only."""
from __future__ import annotations

import re

# Whole words inside names (HF_TOKEN, access_token, db-password), not "tokenizer" or "author".
# A bare "key" counts after a word and "_" or "-" (OPENAI_KEY, --foo-key), not inside a word:
# NCCL_IB_PKEY is an InfiniBand partition key NCCL needs on every node, and neither a record's
# "key" field nor webdataset's "__key__" is a secret.
WORDS = (r"api[_-]?keys?|tokens?|secrets?|passw(?:or)?ds?|passphrases?|credentials?|private[_-]?keys?"
         r"|access[_-]?keys?|(?<=[a-z0-9][_-])keys?|auth")
SECRET_WORDS = r"(?<![a-z])(?:" + WORDS + r")(?![a-z])"
SECRET_NAME = re.compile(SECRET_WORDS, re.I)


def is_secret_name(name: str) -> bool:
    """Whether a variable, key or flag named ``name`` holds a secret (WANDB_API_KEY, HF_TOKEN, ...)."""
    return SECRET_NAME.search(name) is not None
