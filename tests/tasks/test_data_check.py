"""Bad training data is refused before Ray starts, with one line naming the file, the row and the fix."""

import subprocess
import sys

import pandas as pd
import pytest

from tbrm_verl.config import ConfigError
from tbrm_verl.tasks.data_check import check_parquet


def _row(content="What is 1+1?", gt="2"):
    return {"data_source": "t", "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": {"index": 0}}


class _Tok:  # counts characters: an independent, obvious "tokenizer" for the length rule
    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        return list("".join(m["content"] for m in msgs))


def _write(tmp_path, rows, name="d.parquet"):
    p = tmp_path / name
    pd.DataFrame(rows).to_parquet(p)
    return str(p)


def test_good_file_passes(tmp_path):
    assert check_parquet(_write(tmp_path, [_row(), _row("What is 2+2?", "4")]), _Tok(), 64) == 2


@pytest.mark.parametrize(
    "rows, expect",
    [
        ([_row(), _row(content="   ")], "row 1: empty prompt"),
        ([_row(gt="")], "row 0: reward_model.ground_truth"),
        ([_row(), _row(content="x" * 100)], "longer than data.max_prompt_length=64 (first: row 1, 100 tokens)"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, expect):
    with pytest.raises(ConfigError) as err:
        check_parquet(_write(tmp_path, rows), _Tok(), 64)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_schema_less_and_corrupt_files(tmp_path):
    p = _write(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match="missing column"):
        check_parquet(p)
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        check_parquet(str(bad))


def test_cli_refuses_bad_data_in_one_line(tmp_path):
    bad = _write(tmp_path, [_row(), _row(content="")], "bad.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "tbrm_verl.main", f"data.train_files={bad}", f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "row 1: empty prompt" in proc.stderr and "Traceback" not in proc.stderr
