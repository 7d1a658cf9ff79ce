"""The Table 4 reasoning-gym tasks: `python -m tbrm_verl.data reasoning_gym` and tbrm_verl.tasks.reasoning_gym.reward.

Files are checked against reasoning-gym itself (each stored entry is regenerated from the package with its seed and
index), the reward against each task's own answer and against answers built here (wrong, malformed, 1 MB, other
shortest paths found by a breadth-first search written in this file).
"""

from __future__ import annotations

import io
import json
import time
from collections import deque

import pyarrow.parquet as pq
import pytest
import reasoning_gym
from reasoning_gym.utils import SYSTEM_PROMPTS

from tbrm_verl.data.__main__ import main as data_main
from tbrm_verl.tasks.data_check import check_parquet
from tbrm_verl.tasks.math import verify_pool
from tbrm_verl.tasks.reasoning_gym import data as rg
from tbrm_verl.tasks.reasoning_gym.reward import compute_score, score_response

TASKS = ("course_schedule", "family_relationships", "largest_island", "quantum_lock", "shortest_path")  # Table 4
TRAIN, TEST = 30, 10
QUICK_S = 5.0  # a verdict after warm-up: "bounded", with room for a loaded 2-core machine


def _files(d, task):
    return d / f"reasoning_gym_{task}_train.parquet", d / f"reasoning_gym_{task}_test.parquet"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("rg")
    assert data_main(["reasoning_gym", "--out-dir", str(d), "--train-size", str(TRAIN), "--test-size", str(TEST)]) == 0
    return d


def _rows(path):
    return pq.read_table(path).to_pylist()


# ------------------------------------------------------------------------------------------------------------ data
def test_tasks_are_table_4s():
    assert rg.TASKS == TASKS


@pytest.mark.parametrize("task", TASKS)
def test_files_have_verls_schema_and_the_packages_entries(built, task):
    train_path, test_path = _files(built, task)
    for path, split, size, seed in ((train_path, "train", TRAIN, rg.DEFAULT_TRAIN_SEED),
                                    (test_path, "test", TEST, rg.DEFAULT_TEST_SEED)):
        table = pq.read_table(path)
        assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        rows = table.to_pylist()
        assert len(rows) == size
        assert check_parquet(str(path)) == size  # tbrm_verl.main's pre-flight check accepts the file
        ds = reasoning_gym.create_dataset(task, seed=seed, size=10_000)
        for i, row in enumerate(rows):
            assert row["data_source"] == f"reasoning_gym/{task}"
            assert row["ability"] == "reasoning"
            system, user = row["prompt"]
            assert system == {"role": "system", "content": SYSTEM_PROMPTS["default"]}
            assert "<answer>" in system["content"]  # the format the reward extracts
            info = row["extra_info"]
            assert (info["index"], info["split"], info["task"], info["seed"]) == (i, split, task, seed)
            # the stored entry is reasoning-gym's item `source_index` of this seed (as JSON)
            item = ds[info["source_index"]]
            expected = json.loads(json.dumps({k: item[k] for k in ("question", "answer", "metadata")}))
            assert json.loads(info["entry"]) == expected
            assert user == {"role": "user", "content": item["question"]}
            assert row["reward_model"] == {"style": "rule", "ground_truth": item["answer"]}


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_never_share_a_question(built, task):
    train, test = (_rows(p) for p in _files(built, task))
    train_q = [r["prompt"][1]["content"] for r in train]
    test_q = [r["prompt"][1]["content"] for r in test]
    assert len(set(train_q)) == len(train_q) and len(set(test_q)) == len(test_q)
    assert not set(train_q) & set(test_q)


def test_overlapping_seed_ranges_still_give_disjoint_splits(tmp_path):
    """reasoning-gym seeds item idx with seed + idx: test seed = train seed + 5 makes test item i = train item i + 5;
    those are skipped by question text."""
    rg.build_reasoning_gym(tmp_path, train_size=20, test_size=10, train_seed=7, test_seed=12,
                           tasks=["shortest_path"], log=io.StringIO())
    train, test = (_rows(p) for p in _files(tmp_path, "shortest_path"))
    assert len(train) == 20 and len(test) == 10
    assert not {r["prompt"][1]["content"] for r in train} & {r["prompt"][1]["content"] for r in test}
    # train takes idx 0..19 of seed 7 (= keys 7..26); test must skip keys 12..26, i.e. its idx 0..14
    assert [r["extra_info"]["source_index"] for r in train] == list(range(20))
    assert [r["extra_info"]["source_index"] for r in test] == list(range(15, 25))


def test_same_seeds_give_identical_files(built, tmp_path, capsys):
    args = ["reasoning_gym", "--train-size", str(TRAIN), "--test-size", str(TEST), "--tasks", "quantum_lock"]
    assert data_main([*args, "--out-dir", str(tmp_path)]) == 0
    for a, b in zip(_files(built, "quantum_lock"), _files(tmp_path, "quantum_lock")):
        assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()
    assert data_main([*args, "--out-dir", str(tmp_path)]) == 0  # rerun: nothing rewritten
    assert capsys.readouterr().out.count("(up to date)") == 2
    assert data_main([*args, "--out-dir", str(tmp_path / "other"), "--train-seed", "2"]) == 0
    assert _rows(_files(tmp_path / "other", "quantum_lock")[0]) != _rows(_files(tmp_path, "quantum_lock")[0])


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "chess"], "unknown task(s) chess"),
    (["--train-seed", "5", "--test-seed", "5"], "both 5"),
    (["--train-size", "0"], "sizes must be >= 1"),
])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, extra, message):
    assert data_main(["reasoning_gym", "--out-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------- reward
@pytest.fixture(scope="module")
def rows(built):
    return {task: _rows(_files(built, task)[1])[:3] for task in TASKS}


def _score(row, text, **kw):
    return compute_score(data_source=row["data_source"], solution_str=text,
                         ground_truth=row["reward_model"]["ground_truth"], extra_info=row["extra_info"], **kw)


@pytest.mark.parametrize("task", TASKS)
def test_the_entrys_own_answer_is_right(rows, task):
    for row in rows[task]:
        gt = row["reward_model"]["ground_truth"]
        assert _score(row, f"<think>Let me see.</think>\n<answer>{gt}</answer>") == 1.0
        assert _score(row, f"Reasoning... <answer> {gt} </answer>", convention="plus_minus_one") == 1.0
        # the LAST block counts
        assert _score(row, f"<answer>nope</answer> on second thought <answer>{gt}</answer>") == 1.0
        assert _score(row, f"<answer>{gt}</answer> on second thought <answer>nope</answer>") == 0.0


@pytest.mark.parametrize("task", TASKS)
def test_wrong_and_malformed_answers_are_wrong(rows, task):
    row = rows[task][0]
    gt = row["reward_model"]["ground_truth"]
    for text in ("<answer>certainly not this</answer>", gt, f"\\boxed{{{gt}}}", f"<answer>{gt}", f"{gt}</answer>",
                 "<answer></answer>", "", None, 12, ["<answer>", gt, "</answer>"]):
        assert _score(row, text) == 0.0, text
        assert _score(row, text, convention="plus_minus_one") == -1.0, text


@pytest.mark.parametrize("task", TASKS)
def test_huge_answers_are_wrong_in_bounded_time(rows, task):
    row = rows[task][0]
    gt = row["reward_model"]["ground_truth"]
    _score(row, "warm-up")  # pool start-up and reasoning-gym import are not what is timed here
    mb = 1_000_000
    for text in (f"<answer>{gt}" + " A → B" * (mb // 6) + "</answer>",  # a 1 MB answer
                 "<answer>" * (mb // 8),                                # 1 MB of openings, never closed
                 f"<answer>{gt}</answer>" * (mb // (len(gt) + 17)) + "<answer>x</answer>"):
        t0 = time.monotonic()
        assert _score(row, text) == 0.0
        assert time.monotonic() - t0 < QUICK_S
    # a right answer after 1 MB of thinking still counts (the tail is what is read)
    t0 = time.monotonic()
    assert _score(row, "x" * mb + f"<answer>{gt}</answer>") == 1.0
    assert time.monotonic() - t0 < QUICK_S


def test_a_verifier_past_its_timeout_is_wrong_and_the_pool_recovers(rows, monkeypatch):
    row = rows["shortest_path"][0]
    good = f"<answer>{row['reward_model']['ground_truth']}</answer>"
    assert _score(row, good) == 1.0
    # the shared pool: a call that outlives its timeout is killed with its worker, in bounded time
    # (a worker that sleeps is deterministic; a nanosecond timeout races a fast verifier on a loaded machine)
    before = verify_pool.stats["timeouts"]
    t0 = time.monotonic()
    with pytest.raises(verify_pool.PoolTimeout):
        verify_pool.run_in_pool(time.sleep, (60,), 0.5)
    assert time.monotonic() - t0 < QUICK_S
    assert verify_pool.stats["timeouts"] == before + 1
    assert _score(row, good) == 1.0  # a fresh pool (reasoning-gym imported again before timing)
    # and a timed-out verification scores wrong

    def timed_out(*a, **k):
        raise verify_pool.PoolTimeout()

    monkeypatch.setattr(verify_pool, "run_in_pool", timed_out)
    assert _score(row, good) == 0.0


def _shortest_paths(matrix, limit=20):
    """Every shortest path from * to # (up to `limit`), as direction words, by breadth-first search."""
    rows, cols = len(matrix), len(matrix[0])
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    start = next(p for p in cells if matrix[p[0]][p[1]] == "*")
    end = next(p for p in cells if matrix[p[0]][p[1]] == "#")
    moves = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in moves.values():
            q = (r + dr, c + dc)
            if 0 <= q[0] < rows and 0 <= q[1] < cols and matrix[q[0]][q[1]] != "X" and q not in dist:
                dist[q] = dist[(r, c)] + 1
                queue.append(q)
    if end not in dist:
        return []
    out = []

    def walk(p, path):
        if len(out) >= limit:
            return
        if p == end:
            out.append(" ".join(path))
            return
        if dist[p] >= dist[end]:
            return
        for name, (dr, dc) in moves.items():
            q = (p[0] + dr, p[1] + dc)
            if dist.get(q) == dist[p] + 1:
                walk(q, path + [name])

    walk(start, [])
    return out


def test_shortest_path_accepts_every_shortest_path_and_only_those(built):
    """The verifier, not string equality: any path as short as the entry's is right; a longer valid one gets the
    task's partial credit (0.5), which the reward counts as wrong."""
    checked_alternative = checked_longer = False
    for row in _rows(_files(built, "shortest_path")[1]):
        entry = json.loads(row["extra_info"]["entry"])
        paths = _shortest_paths(entry["metadata"]["matrix"])
        if not paths:
            assert entry["answer"] == "infeasible"
            continue
        assert len(paths[0].split()) == len(entry["answer"].split())  # the BFS agrees with the task's answer
        for p in paths:
            assert _score(row, f"<answer>{p}</answer>") == 1.0, p
            checked_alternative |= p != entry["answer"]
        first = paths[0].split()[0]
        back = {"up": "down", "down": "up", "left": "right", "right": "left"}[first]
        longer = f"{first} {back} {paths[0]}"  # step out and back: valid, two moves longer
        assert score_response(row["data_source"], f"<answer>{longer}</answer>", row["extra_info"]) == 0.5
        assert _score(row, f"<answer>{longer}</answer>") == 0.0
        checked_longer = True
    assert checked_alternative and checked_longer


def test_rows_without_an_entry_or_task_are_refused(rows):
    row = rows["family_relationships"][0]
    with pytest.raises(ValueError, match="extra_info\\['entry'\\] is missing"):
        compute_score("reasoning_gym/family_relationships", "<answer>x</answer>", "x", extra_info={"index": 0})
    with pytest.raises(ValueError, match="not a reasoning-gym task"):
        compute_score("dapo_math", "<answer>x</answer>", "x", extra_info=row["extra_info"])
    with pytest.raises(ValueError, match="no task 'chess'"):
        compute_score("reasoning_gym/chess", "<answer>x</answer>", "x", extra_info=row["extra_info"])
    with pytest.raises(ValueError, match="unknown reward convention"):
        _score(row, "<answer>x</answer>", convention="half")
