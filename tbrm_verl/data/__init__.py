"""Data preparation for TBRM (see ``tbrm_verl.tasks.math.prep`` for the formats and rules).

CLI::

    python -m tbrm_verl.data train --out-dir DIR [--source HUB_ID_OR_FILE] [--strict] [--template qwen_math|r1]
    python -m tbrm_verl.data eval  --out-dir DIR [--sources NAME=HUB_ID_OR_FILE ...] [--names NAME ...] [--strict]
                                   [--template qwen_math|r1]
    python -m tbrm_verl.data reasoning_gym --out-dir DIR [--train-size N] [--test-size M] [--tasks TASK ...]

(``tbrm_verl.tasks.reasoning_gym.data``: the Table 4 tasks; needs the ``reasoning_gym`` extra.)
"""

from tbrm_verl.tasks.math.prep import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DEFAULT_TRAIN_SOURCE,
    EVAL_NAMES,
    EVAL_SOURCES,
    R1_TEMPLATE,
    RAW_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    TEMPLATES,
    TRAIN_DATA_SOURCE,
    TRAIN_FILE_NAME,
    EvalSource,
    MalformedRecord,
    PrepError,
    Report,
    build_eval,
    build_train,
    dapo_record_to_pair,
    make_prompt,
    normalize_ground_truth,
    strip_dapo_wrapper,
)

__all__ = [
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "DEFAULT_TRAIN_SOURCE",
    "EVAL_NAMES",
    "EVAL_SOURCES",
    "R1_TEMPLATE",
    "RAW_CHAT_TEMPLATE",
    "SYSTEM_PROMPT",
    "TEMPLATES",
    "TRAIN_DATA_SOURCE",
    "TRAIN_FILE_NAME",
    "EvalSource",
    "MalformedRecord",
    "PrepError",
    "Report",
    "build_eval",
    "build_train",
    "dapo_record_to_pair",
    "make_prompt",
    "normalize_ground_truth",
    "strip_dapo_wrapper",
]
