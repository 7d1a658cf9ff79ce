"""Tests for tbrm_verl.data (DAPO train set and eval sets -> verl parquet). Fixtures are hand-written under
tests/fixtures/; expected values below are written by hand from those fixtures."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tbrm_verl.data import (  # noqa: E402
    MalformedRecord,
    dapo_record_to_pair,
    normalize_ground_truth,
    strip_dapo_wrapper,
)
from tbrm_verl.data.__main__ import main  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"
DAPO = FIX / "dapo_small.jsonl"

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
WRAP_PRE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
WRAP_SUF = '\n\nRemember to put your answer on its own line after "Answer:".'

# The three unique problems of dapo_small.jsonl, in first-occurrence order (rows 0, 1, 4), with their answers.
Q1 = (
    "In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$ and $AD = 1$. "
    "If $AB + AC = \\frac{a\\sqrt{b}}{c}$, find $a + b + c$."
)
Q2 = "Let $x = \\sqrt{7}$.\n\nFind $x^2$."
Q3 = "What is the value of $5!$?"
TRAIN_EXPECTED = [(Q1, "34", 0), (Q2, "7", 1), (Q3, "120", 4)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_train(out_dir: Path, *extra: str, source: Path = DAPO) -> int:
    return main(
        ["train", "--source", str(source), "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "hf_cache"), *extra]
    )


@pytest.fixture(scope="module")
def train_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "out"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err, std = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(std):
        rc = run_train(out, "--progress-every", "4")
    return {"rc": rc, "out": out, "stderr": err.getvalue(), "stdout": std.getvalue(), "file": out / "dapo_math_train.parquet"}


# ------------------------------------------------------------------------------------------------ pure helpers
def test_strip_dapo_wrapper():
    assert strip_dapo_wrapper(WRAP_PRE + "What is $1+1$?" + WRAP_SUF) == "What is $1+1$?"
    # Paragraph breaks inside the question are kept.
    assert strip_dapo_wrapper(WRAP_PRE + "A.\n\nB?" + WRAP_SUF) == "A.\n\nB?"
    # No wrapper: kept as is (outer whitespace stripped).
    assert strip_dapo_wrapper("  What is $2+2$?\n") == "What is $2+2$?"
    # A variant first paragraph of the same instruction is dropped too.
    assert strip_dapo_wrapper("Solve the following math problem step by step. Be brief.\n\nWhat is 3?") == "What is 3?"
    assert strip_dapo_wrapper(WRAP_PRE + WRAP_SUF.strip()) == ""


def test_dapo_record_validation():
    good = {"prompt": [{"role": "user", "content": WRAP_PRE + "Q?" + WRAP_SUF}], "reward_model": {"ground_truth": " 5 "}}
    assert dapo_record_to_pair(good) == ("Q?", "5")
    bad = [
        {"reward_model": {"ground_truth": "5"}},  # no prompt
        {"prompt": "", "reward_model": {"ground_truth": "5"}},  # empty question
        {"prompt": [{"role": "assistant", "content": "Q?"}], "reward_model": {"ground_truth": "5"}},  # no user turn
        {"prompt": [{"role": "user", "content": 7}], "reward_model": {"ground_truth": "5"}},  # non-string question
        {"prompt": 3, "reward_model": {"ground_truth": "5"}},
        {"prompt": [{"role": "user", "content": "Q?"}], "reward_model": {"ground_truth": 5}},  # non-string answer
        {"prompt": [{"role": "user", "content": "Q?"}], "reward_model": {"ground_truth": "  "}},
        {"prompt": [{"role": "user", "content": "Q?"}], "reward_model": None},
    ]
    for rec in bad:
        with pytest.raises(MalformedRecord):
            dapo_record_to_pair(rec)


def test_normalize_ground_truth():
    assert normalize_ground_truth(27.0) == "27"
    assert normalize_ground_truth(1.5) == "1.5"
    assert normalize_ground_truth(204) == "204"
    assert normalize_ground_truth("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert normalize_ground_truth("so the answer is $\\boxed{25}$.") == "25"
    assert normalize_ground_truth(["$3$", "$4$"]) == "3, 4"
    for bad in (None, "", "  ", True, [], {"a": 1}, float("nan")):
        with pytest.raises(MalformedRecord):
            normalize_ground_truth(bad)


# ------------------------------------------------------------------------------------------------ train set
def test_train_dedup_and_counts(train_build):
    assert train_build["rc"] == 0
    assert train_build["stdout"].strip() == (
        f"train: read 10 records, skipped 3 malformed, removed 4 duplicates (1 with a different answer), "
        f"3 problems -> {train_build['file']} (written)"
    )
    assert pq.read_metadata(train_build["file"]).num_rows == 3


def test_train_exact_prompts_and_schema(train_build):
    table = pq.read_table(train_build["file"])
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert table.schema.field("data_source").type == pa.string()
    assert table.schema.field("prompt").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert table.schema.field("reward_model").type == pa.struct([("style", pa.string()), ("ground_truth", pa.string())])
    rows = table.to_pylist()
    for i, (row, (question, answer, src)) in enumerate(zip(rows, TRAIN_EXPECTED)):
        assert row["data_source"] == "dapo_math"
        assert row["ability"] == "math"
        assert row["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
        assert row["extra_info"] == {"index": i, "split": "train", "source_index": src}


def test_train_malformed_reported_and_progress(train_build):
    err = train_build["stderr"]
    assert "skipping malformed record at index 3: empty ground truth" in err
    assert "skipping malformed record at index 7: empty question" in err
    assert "skipping malformed record at index 8: missing reward_model.ground_truth" in err
    assert "train: 4/10 records read" in err and "train: 8/10 records read" in err
    assert "1 duplicates had a different ground truth" in err


def test_train_idempotent(train_build, tmp_path, capsys):
    first = sha(train_build["file"])
    mtime = train_build["file"].stat().st_mtime_ns
    # Same output directory: nothing rewritten.
    assert run_train(train_build["out"]) == 0
    assert "(up to date)" in capsys.readouterr().out
    assert sha(train_build["file"]) == first
    assert train_build["file"].stat().st_mtime_ns == mtime
    # A fresh directory gives the same bytes, and no temporary file is left behind.
    assert run_train(tmp_path / "again") == 0
    assert sha(tmp_path / "again" / "dapo_math_train.parquet") == first
    assert sorted(os.listdir(tmp_path / "again")) == ["dapo_math_train.parquet"]


def test_train_from_parquet_input(train_build, tmp_path):
    # The same records as a parquet file (the public dataset's format) give the same output.
    import datasets

    src = tmp_path / "dapo_small.parquet"
    datasets.load_dataset("json", data_files=str(DAPO), split="train", cache_dir=str(tmp_path / "c")).to_parquet(str(src))
    assert run_train(tmp_path / "out", source=src) == 0
    assert sha(tmp_path / "out" / "dapo_math_train.parquet") == sha(train_build["file"])


def test_train_strict_refuses(tmp_path, capsys):
    out = tmp_path / "strict"
    assert run_train(out, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train: malformed record at index 3: empty ground truth"]
    assert not (out / "dapo_math_train.parquet").exists()


def test_missing_input_file_cli(tmp_path):
    missing = tmp_path / "nope" / "dapo.parquet"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tbrm_verl.data", "train", "--source", str(missing), "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=str(REPO), env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: input file not found: {missing}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ eval sets
EVAL_FIXTURES = {
    "math500": FIX / "math500_small.jsonl",
    "aime24": FIX / "aime24_small.jsonl",
    "amc23": FIX / "amc23_small.jsonl",
    "olympiadbench": FIX / "olympiadbench_small.jsonl",
}
EVAL_EXPECTED = {
    "math500": [
        ("Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.", "\\left( 3, \\frac{\\pi}{2} \\right)", 0),
        ("If $f(x) = \\frac{3x-2}{x-2}$, what is $f(-2)$?", "2", 2),
    ],
    "aime24": [
        ("Every morning Aya goes for a $9$-kilometer-long walk. Find the number of minutes the walk takes her.", "204", 0),
        ("There exist real numbers $x$ and $y$, both greater than 1, such that $\\log_x(y^x)=\\log_y(x^{4y})=10$. "
         "Find $xy$.", "25", 1),
    ],
    "amc23": [
        ("Cities $A$ and $B$ are $45$ miles apart. How many miles from City $A$ will they be when they meet?", "27", 0),
        ("What is the average of $1$ and $2$?", "1.5", 1),
    ],
    "olympiadbench": [
        ("Find the smallest positive real $k$ such that the inequality holds.", "\\frac{1}{2}", 0),
        ("Determine all pairs $(a, b)$ of positive integers such that $a + b = 7$ and $ab = 12$; give $a$ and $b$.", "3, 4", 2),
    ],
}


def run_eval(out_dir: Path, *extra: str) -> int:
    srcs = [f"{k}={v}" for k, v in EVAL_FIXTURES.items()]
    return main(
        ["eval", "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "hf_cache"),
         "--names", *EVAL_FIXTURES, "--sources", *srcs, *extra]
    )


def test_eval_sets(tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_eval(out) == 0
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == sorted(f"{n}.parquet" for n in EVAL_FIXTURES)
    for name, expected in EVAL_EXPECTED.items():
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        assert len(rows) == len(expected)
        for i, (row, (question, answer, src)) in enumerate(zip(rows, expected)):
            assert row["data_source"] == name
            assert row["ability"] == "math"
            assert row["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
            assert row["extra_info"] == {"index": i, "split": "test", "source_index": src}
    assert "math500: skipping malformed record at index 1: empty answer" in captured.err
    assert "olympiadbench: skipping malformed record at index 1: empty question" in captured.err
    assert "math500: read 3 records, skipped 1 malformed, 2 problems" in captured.out
    # Idempotent.
    hashes = {n: sha(out / f"{n}.parquet") for n in EVAL_FIXTURES}
    assert run_eval(out) == 0
    assert capsys.readouterr().out.count("(up to date)") == 4
    assert {n: sha(out / f"{n}.parquet") for n in EVAL_FIXTURES} == hashes


def test_eval_strict_and_errors(tmp_path, capsys):
    assert run_eval(tmp_path / "e", "--strict") == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: math500: malformed record at index 1: empty answer"]

    assert main(["eval", "--out-dir", str(tmp_path / "x"), "--names", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gsm8k" in err[0] and "aime24" in err[0] and "olympiadbench" in err[0]

    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "--out-dir", str(tmp_path / "y"), "--names", "minerva", "--sources", f"minerva={missing}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: input file not found: {missing}"]


def test_default_eval_sources():
    from tbrm_verl.data import EVAL_SOURCES

    assert list(EVAL_SOURCES) == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert EVAL_SOURCES["math500"].hub_id == "HuggingFaceH4/MATH-500"
    assert EVAL_SOURCES["minerva"].hub_id == "math-ai/minervamath"


# ------------------------------------------------------------------------------------------------ verl reads it
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SYSTEM, Q1, Q2, Q3, "system user assistant"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def test_verl_rlhf_dataset_reads_output(train_build, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = _tiny_tokenizer()
    config = {
        "max_prompt_length": 4096,
        "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": 1,
        "cache_dir": str(tmp_path / "verl_cache"),
    }
    ds = RLHFDataset(data_files=[str(train_build["file"])], tokenizer=tokenizer, config=config)
    assert len(ds) == 3
    for i, (question, answer, _) in enumerate(TRAIN_EXPECTED):
        item = ds[i]
        assert item["data_source"] == "dapo_math"
        assert item["reward_model"]["ground_truth"] == answer
        assert item["index"] == i
        rendered = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
        # The paper's Qwen2.5-Math prompt (spec section 2), written out by hand.
        assert rendered == (
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        )
