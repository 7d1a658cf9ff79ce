"""Build verl parquet files for TBRM: the DAPO math training prompts and the six evaluation sets.

Output schema (one row per problem; what ``verl.utils.dataset.rl_dataset.RLHFDataset`` reads):

=============  ========================================================================================
column         value
=============  ========================================================================================
data_source    ``"dapo_math"`` (train) or the eval tag: aime24, aime25, amc23, math500, minerva, olympiadbench
prompt         ``[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]``
               (``--template r1``: ``[{"role": "user", "content": R1_TEMPLATE.format(question=question)}]``)
ability        ``"math"``
reward_model   ``{"style": "rule", "ground_truth": str}``
extra_info     ``{"index": int (row number in this file), "split": "train" | "test",
               "source_index": int (row number in the input)}``
=============  ========================================================================================

With Qwen2.5-Math's ChatML chat template the prompt renders exactly as the paper's template (spec section 2)::

    <|im_start|>system\\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

Templates (``template=``, CLI ``--template``): ``qwen_math`` (default, above) or ``r1``, the DeepSeek-R1 template of
the paper's Figure 1b (``R1_TEMPLATE``: the whole prompt, ending in ``Assistant:``, asking for ``<think>`` reasoning and
an ``<answer>`` block, which ``tbrm_verl.tasks.math.reward`` scores). verl 0.9.1 has no raw-string prompt: ``RLHFDataset`` hands
the ``prompt`` messages to the agent loop, which always renders them with the tokenizer's chat template. So an r1 row
is a single user message holding the whole template, and a run renders it verbatim with verl's
``actor_rollout_ref.model.custom_chat_template`` set to ``RAW_CHAT_TEMPLATE`` (the messages' text, nothing added)::

    'actor_rollout_ref.model.custom_chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"'

Without it Qwen2.5-Math's ChatML template wraps the message and, as the row has no system message, adds its default
``\\boxed{}`` system prompt. The files' names do not depend on the template: write r1 files to their own directory.

Training set (``BytedTsinghua-SIA/DAPO-Math-17k``): its rows are verl rows whose single user message wraps the
problem in DAPO's instruction text::

    Solve the following math problem step by step. The last line of your response should be of the form
    Answer: $Answer (without quotes) where $Answer is the answer to the problem.\\n\\n{question}\\n\\n
    Remember to put your answer on its own line after "Answer:".

(the first two lines are one line in the data). ``strip_dapo_wrapper`` removes exactly that prefix and suffix; a
prompt that starts with "Solve the following math problem step by step." but has another first paragraph loses its
first paragraph; a prompt without the wrapper is kept as it is. The public parquet repeats each problem (about 1.79M
rows): rows are de-duplicated by the bare question text, keeping the first occurrence (about 17.4k unique problems);
duplicates whose ground truth differs are counted and reported ("conflicting"), the first answer is kept.

Evaluation sets: see ``EVAL_SOURCES`` (default hub ids, splits, and the question / answer fields tried in order).
Ground truths are normalised: numbers become strings (``27.0`` -> ``"27"``), a ``\\boxed{...}`` answer (e.g. a
solution field) becomes its last boxed content, surrounding ``$...$`` is removed, and a list of answers
(OlympiadBench's ``final_answer``) is joined with ``", "``. Evaluation rows are not de-duplicated.

Malformed records (question or answer missing, not a string, or empty) are reported with their input index and
skipped; with ``strict=True`` the first one raises ``PrepError`` (the CLI exits with code 2).

Outputs are written to a temporary file and renamed into place; when the new bytes equal the existing file the file is
left untouched ("up to date"), so re-running gives byte-identical output.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {question}. Assistant:"
)
TEMPLATES = ("qwen_math", "r1")
DEFAULT_TEMPLATE = "qwen_math"
#: a chat template that renders the messages' text and nothing else (for r1 rows; see the module docstring)
RAW_CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
_DAPO_PREFIX_HEAD = "Solve the following math problem step by step."
_DAPO_SUFFIX_HEAD = '\n\nRemember to put your answer on its own line after "Answer:"'

DEFAULT_TRAIN_SOURCE = "BytedTsinghua-SIA/DAPO-Math-17k"
DEFAULT_TRAIN_SPLIT = "train"
TRAIN_DATA_SOURCE = "dapo_math"
TRAIN_FILE_NAME = "dapo_math_train.parquet"
ABILITY = "math"

LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
MAX_LISTED_MALFORMED = 20


@dataclass(frozen=True)
class EvalSource:
    """Where an evaluation set comes from and which fields hold the question and the answer (first present wins)."""

    name: str  # data_source tag and output file stem
    hub_id: str
    split: str
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]


EVAL_SOURCES: dict[str, EvalSource] = {
    s.name: s
    for s in (
        # 30 problems (AIME 2024 I+II); answer in `solution` as \boxed{...} on the hub (an `answer` column wins if any).
        EvalSource("aime24", "math-ai/aime24", "test", ("problem", "question"), ("answer", "solution")),
        # 30 problems (AIME 2025 I+II).
        EvalSource("aime25", "math-ai/aime25", "test", ("problem", "question"), ("answer", "solution")),
        # 40 problems (AMC 2023); numeric answers.
        EvalSource("amc23", "math-ai/amc23", "test", ("question", "problem"), ("answer", "solution")),
        # 500 problems (Lightman et al. subset of MATH).
        EvalSource("math500", "HuggingFaceH4/MATH-500", "test", ("problem", "question"), ("answer", "solution")),
        # 272 problems (Minerva Math / OCWCourses).
        EvalSource("minerva", "math-ai/minervamath", "test", ("question", "problem"), ("answer", "solution")),
        # 675 text-only English competition math problems; `final_answer` is a list of strings.
        EvalSource(
            "olympiadbench",
            "math-ai/olympiadbench",
            "test",
            ("question", "problem"),
            ("final_answer", "answer", "solution"),
        ),
    )
}
EVAL_NAMES = tuple(EVAL_SOURCES)


class PrepError(Exception):
    """A user-facing error: the CLI prints ``error: <message>`` on one line and exits with code 2."""


class MalformedRecord(ValueError):
    """One input record cannot be used (reason in the message)."""


# --------------------------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------------------------
def strip_dapo_wrapper(text: str) -> str:
    """The bare question inside DAPO's instruction wrapper (see the module docstring); stripped of outer spaces."""
    t = text.strip()
    prefix, suffix = DAPO_PREFIX.strip(), DAPO_SUFFIX.strip()
    if t.startswith(prefix):
        t = t[len(prefix) :]
    elif t.startswith(_DAPO_PREFIX_HEAD) and "\n\n" in t:
        t = t.split("\n\n", 1)[1]
    t = t.strip()
    if t.endswith(suffix):
        t = t[: -len(suffix)]
    elif _DAPO_SUFFIX_HEAD.strip() in t:
        t = t.rsplit(_DAPO_SUFFIX_HEAD.strip(), 1)[0]
    return t.strip()


def make_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> list[dict[str, str]]:
    """Chat messages for ``question``: ``qwen_math``: the \\boxed{} system prompt and the bare question; ``r1``: one
    user message holding the whole DeepSeek-R1 prompt (see the module docstring)."""
    if template == "qwen_math":
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if template == "r1":
        return [{"role": "user", "content": R1_TEMPLATE.format(question=question)}]
    raise PrepError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or type(x).__name__ == "ndarray"


def _user_text(prompt: Any) -> str:
    """The text of the (last) user message of a verl prompt (a list of messages) or a plain string prompt."""
    if isinstance(prompt, str):
        return prompt
    if not _is_sequence(prompt):
        raise MalformedRecord(f"prompt is {type(prompt).__name__}, expected a list of chat messages")
    users = [m for m in list(prompt) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise MalformedRecord("prompt has no user message")
    content = users[-1].get("content")
    if not isinstance(content, str):
        raise MalformedRecord(f"user message content is {type(content).__name__}, expected str")
    return content


def dapo_record_to_pair(record: dict) -> tuple[str, str]:
    """(bare question, ground truth) of one DAPO-format record; raises ``MalformedRecord``."""
    if "prompt" not in record or record["prompt"] is None:
        raise MalformedRecord("missing prompt")
    question = strip_dapo_wrapper(_user_text(record["prompt"]))
    if not question:
        raise MalformedRecord("empty question")
    rm = record.get("reward_model")
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        raise MalformedRecord("missing reward_model.ground_truth")
    gt = rm["ground_truth"]
    if not isinstance(gt, str):
        raise MalformedRecord(f"ground truth is {type(gt).__name__}, expected str")
    gt = gt.strip()
    if not gt:
        raise MalformedRecord("empty ground truth")
    return question, gt


def normalize_ground_truth(value: Any) -> str:
    """An evaluation answer as one string (see the module docstring); raises ``MalformedRecord``."""
    if value is None:
        raise MalformedRecord("missing answer")
    if isinstance(value, bool):
        raise MalformedRecord("answer is bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedRecord(f"answer is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        s = value.strip()
        if "\\boxed" in s or "\\fbox" in s:
            from tbrm_verl.tasks.math.reward import last_boxed_answer

            boxed = last_boxed_answer(s)
            if boxed is None:
                raise MalformedRecord("answer has a \\boxed{} that cannot be read")
            s = boxed
        while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s[1:-1].strip()
        if not s:
            raise MalformedRecord("empty answer")
        return s
    if _is_sequence(value):
        parts = [normalize_ground_truth(v) for v in list(value)]
        if not parts:
            raise MalformedRecord("empty answer list")
        return ", ".join(parts)
    raise MalformedRecord(f"answer is {type(value).__name__}")


def eval_record_to_pair(record: dict, question_field: str, answer_field: str) -> tuple[str, str]:
    q = record.get(question_field)
    if q is None:
        raise MalformedRecord(f"missing question field {question_field!r}")
    if not isinstance(q, str):
        raise MalformedRecord(f"question is {type(q).__name__}, expected str")
    q = q.strip()
    if not q:
        raise MalformedRecord("empty question")
    return q, normalize_ground_truth(record.get(answer_field))


def make_row(
    data_source: str,
    question: str,
    answer: str,
    index: int,
    split: str,
    source_index: int,
    template: str = DEFAULT_TEMPLATE,
) -> dict:
    return {
        "data_source": data_source,
        "prompt": make_prompt(question, template),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": index, "split": split, "source_index": source_index},
    }


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    return (
        Path(source).suffix.lower() in LOCAL_FORMATS
        or source.startswith(("/", "./", "../", "~"))
        or source.count("/") > 1
        or os.sep == "\\" and "\\" in source
    )


def load_source(source: str, split: str, cache_dir: str | None = None):
    """A ``datasets.Dataset`` from a local parquet/json/jsonl file or directory, or a hub id (``ID`` or ``ID:SPLIT``).

    A local file is read whole (its split is ignored). Raises ``PrepError`` with a one-line message.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.exists():
        try:
            if path.is_dir():
                return datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
            fmt = LOCAL_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise PrepError(
                    f"unsupported input file type {path.suffix!r} (use .parquet, .json or .jsonl): {source}"
                )
            return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir)
        except PrepError:
            raise
        except Exception as e:  # noqa: BLE001
            raise PrepError(f"could not read {source}: {type(e).__name__}: {_first_line(e)}") from None
    if _looks_like_path(source):
        raise PrepError(f"input file not found: {source}")
    hub_id, _, hub_split = source.partition(":")
    hub_split = hub_split or split
    try:
        return datasets.load_dataset(hub_id, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        raise PrepError(
            f"could not load {hub_id!r} (split {hub_split!r}) from the Hugging Face hub: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


def iter_records(ds, batch_size: int = 4096) -> Iterator[dict]:
    """Rows of a ``datasets.Dataset`` as dicts, read in batches (much faster than ``ds[i]``)."""
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            yield dict(zip(cols, values))


# --------------------------------------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    name: str
    read: int = 0
    malformed: int = 0
    duplicates: int = 0
    conflicting: int = 0
    written: int = 0
    path: str = ""
    status: str = ""  # "written" | "up to date"

    def summary(self) -> str:
        parts = [f"{self.name}: read {self.read} records", f"skipped {self.malformed} malformed"]
        if self.name == "train":
            parts.append(f"removed {self.duplicates} duplicates ({self.conflicting} with a different answer)")
        parts.append(f"{self.written} problems -> {self.path} ({self.status})")
        return ", ".join(parts)


class _Progress:
    def __init__(self, name: str, total: int | None, every: int, out: TextIO):
        self.name, self.total, self.every, self.out = name, total, every, out

    def tick(self, n: int) -> None:
        if self.every > 0 and n % self.every == 0:
            total = f"/{self.total}" if self.total else ""
            print(f"{self.name}: {n}{total} records read", file=self.out, flush=True)


def _process(
    records: Iterable[dict],
    to_pair: Callable[[dict], tuple[str, str]],
    report: Report,
    strict: bool,
    dedup: bool,
    progress: _Progress,
    log: TextIO,
) -> list[tuple[int, str, str]]:
    """(source_index, question, answer) of the usable records, in input order."""
    kept: list[tuple[int, str, str]] = []
    seen: dict[str, str] = {}
    for idx, rec in enumerate(records):
        report.read += 1
        progress.tick(report.read)
        try:
            if not isinstance(rec, dict):
                raise MalformedRecord(f"record is {type(rec).__name__}, expected a mapping")
            question, answer = to_pair(rec)
        except MalformedRecord as e:
            if strict:
                raise PrepError(f"{report.name}: malformed record at index {idx}: {e}") from None
            report.malformed += 1
            if report.malformed <= MAX_LISTED_MALFORMED:
                print(f"{report.name}: skipping malformed record at index {idx}: {e}", file=log)
            elif report.malformed == MAX_LISTED_MALFORMED + 1:
                print(f"{report.name}: (further malformed records are counted, not listed)", file=log)
            continue
        if dedup:
            first = seen.get(question)
            if first is not None:
                report.duplicates += 1
                if first != answer:
                    report.conflicting += 1
                continue
            seen[question] = answer
        kept.append((idx, question, answer))
    return kept


def rows_to_table(rows: list[dict], schema=None):
    """A pyarrow table of ``rows`` with ``schema`` (default: the math files' schema above)."""
    import pyarrow as pa

    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct([("index", pa.int64()), ("split", pa.string()), ("source_index", pa.int64())]),
            ),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def write_parquet_atomic(rows: list[dict], path: Path, schema=None) -> str:
    """Write ``rows`` (with ``schema``, default the math files' one) to ``path`` via a temporary file + rename.
    Returns "written" or "up to date" (same bytes)."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(rows_to_table(rows, schema), tmp, compression="zstd")
        if path.is_file() and path.stat().st_size == tmp.stat().st_size and path.read_bytes() == tmp.read_bytes():
            tmp.unlink()
            return "up to date"
        os.replace(tmp, path)
        return "written"
    finally:
        if tmp.exists():
            tmp.unlink()


def build_train(
    source: str = DEFAULT_TRAIN_SOURCE,
    out_dir: str | os.PathLike = ".",
    *,
    split: str = DEFAULT_TRAIN_SPLIT,
    strict: bool = False,
    cache_dir: str | None = None,
    progress_every: int = 100_000,
    log: TextIO | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Report:
    """DAPO prompts -> ``out_dir/dapo_math_train.parquet`` (unique problems; Qwen2.5-Math template or ``r1``)."""
    log = log or sys.stderr
    make_prompt("", template)  # an unknown template fails before the download
    report = Report("train")
    ds = load_source(source, split, cache_dir)
    progress = _Progress("train", len(ds), progress_every, log)
    kept = _process(iter_records(ds), dapo_record_to_pair, report, strict, True, progress, log)
    rows = [make_row(TRAIN_DATA_SOURCE, q, a, i, "train", src, template) for i, (src, q, a) in enumerate(kept)]
    path = Path(out_dir) / TRAIN_FILE_NAME
    report.written, report.path = len(rows), str(path)
    report.status = write_parquet_atomic(rows, path)
    if report.conflicting:
        print(f"train: warning: {report.conflicting} duplicates had a different ground truth (first kept)", file=log)
    return report


def build_eval(
    out_dir: str | os.PathLike = ".",
    sources: dict[str, str] | None = None,
    *,
    names: Iterable[str] | None = None,
    strict: bool = False,
    cache_dir: str | None = None,
    progress_every: int = 100_000,
    log: TextIO | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> list[Report]:
    """The evaluation sets -> ``out_dir/{name}.parquet``. ``sources`` maps a name to a local file or hub id
    (default: ``EVAL_SOURCES[name].hub_id``); ``names`` restricts which sets are built (default: all six)."""
    log = log or sys.stderr
    make_prompt("", template)
    sources = dict(sources or {})
    names = list(names) if names else list(EVAL_NAMES)
    unknown = sorted((set(sources) | set(names)) - set(EVAL_SOURCES))
    if unknown:
        raise PrepError(f"unknown evaluation set(s) {', '.join(unknown)}; valid names: {', '.join(EVAL_NAMES)}")
    reports = []
    for name in names:
        spec = EVAL_SOURCES[name]
        src = sources.get(name, spec.hub_id)
        ds = load_source(src, spec.split, cache_dir)
        cols = list(ds.column_names)
        qf = next((f for f in spec.question_fields if f in cols), None)
        af = next((f for f in spec.answer_fields if f in cols), None)
        if qf is None or af is None:
            missing = "question" if qf is None else "answer"
            wanted = spec.question_fields if qf is None else spec.answer_fields
            raise PrepError(
                f"{name}: no {missing} field in {src} (looked for {', '.join(wanted)}; columns: {', '.join(cols)})"
            )
        report = Report(name)
        progress = _Progress(name, len(ds), progress_every, log)
        kept = _process(
            iter_records(ds), lambda r: eval_record_to_pair(r, qf, af), report, strict, False, progress, log
        )
        rows = [make_row(name, q, a, i, "test", s, template) for i, (s, q, a) in enumerate(kept)]
        path = Path(out_dir) / f"{name}.parquet"
        report.written, report.path = len(rows), str(path)
        report.status = write_parquet_atomic(rows, path)
        reports.append(report)
    return reports
