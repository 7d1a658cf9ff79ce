"""The work-setting bench (tbrm_verl/tools/bench_work.py, work_assets.py, work_memory.py): its assets at the tiny
size, per-worker memory accounting against processes that allocate a known number of bytes, the roles of Ray's real
process titles, the cpu_hf rollout's ignore_eos, the targets' arithmetic and the --setting dispatch of
tbrm_verl.tools.bench."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from tbrm_verl.tools import bench_work as bw
from tbrm_verl.tools import work_assets as wa
from tbrm_verl.tools import work_memory as wm
from tbrm_verl.tools.procmem import ProcessTreeSampler, ProcStats

TINY = wa.SIZES["tiny"]
MiB = 2**20


# ------------------------------------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return wa.ensure_work_assets("tiny", cache_dir=str(tmp_path_factory.mktemp("bw") / "tiny"), verbose=False)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model_path"])


def test_tokenizer_has_the_requested_vocabulary_and_round_trips(assets, tokenizer):
    assert len(tokenizer) == TINY.vocab
    text = wa.make_text(wa.make_lexicon(TINY.lexicon), 200, __import__("random").Random(7))
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # BPE merges: the generated text takes fewer tokens than bytes
    assert len(tokenizer.encode(text, add_special_tokens=False)) < 0.7 * len(text.encode())


def test_model_size_is_the_closed_form_qwen2_count(assets, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(assets["model_path"])
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        "qwen2", TINY.vocab, TINY.hidden, TINY.layers)
    assert cfg.tie_word_embeddings and cfg.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(assets["model_path"])
    h, L, H, kv, d, i, V = TINY.hidden, TINY.layers, TINY.heads, TINY.kv_heads, TINY.head_dim, TINY.intermediate, \
        TINY.vocab
    per_layer = (h * H * d + H * d) + 2 * (h * kv * d + kv * d) + H * d * h + 3 * h * i + 2 * h  # q,k,v (+bias), o, MLP, norms
    assert sum(p.numel() for p in model.parameters()) == V * h + L * per_layer + h


def test_every_prompt_renders_to_exactly_prompt_tokens(assets, tokenizer):
    import pandas as pd

    for key, n in (("train_file", TINY.train_rows), ("val_file", TINY.val_rows)):
        df = pd.read_parquet(assets[key])
        assert len(df) == n
        for prompt, rm in zip(df["prompt"], df["reward_model"]):
            ids = tokenizer.apply_chat_template([dict(m) for m in prompt], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert len(ids) == TINY.prompt_tokens
            assert rm["ground_truth"] in wa.LETTERS


def test_cache_hit_does_not_rebuild(assets):
    done = os.path.join(assets["cache_dir"], "DONE")
    before = os.stat(done).st_mtime_ns
    assert wa.ensure_work_assets("tiny", cache_dir=assets["cache_dir"], verbose=False) == assets
    assert os.stat(done).st_mtime_ns == before


def test_synthetic_reward():
    assert wa.compute_score(solution_str="banana", ground_truth="a") == 0.0  # 3 a's
    assert wa.compute_score(solution_str="bana", ground_truth="a") == 1.0
    assert wa.compute_score(solution_str="xyz", ground_truth="e") == 1.0  # zero is even
    assert wa.compute_score(solution_str="e", ground_truth="e", convention="plus_minus_one") == -1.0


def test_overrides_fix_lengths_micro_batches_and_ignore_eos(assets):
    o = dict(x.split("=", 1) for x in bw.work_overrides(assets, TINY, micro_batch=2))
    assert o["data.max_prompt_length"] == str(TINY.prompt_tokens)
    assert o["data.max_response_length"] == str(TINY.response_tokens)
    assert o["actor_rollout_ref.rollout.ignore_eos"] == "true"
    mb_keys = [k for k in o if "micro_batch_size" in k]
    assert len(mb_keys) == 5 and {o[k] for k in mb_keys} == {"2"}


def test_overrides_name_the_reward_function_where_it_lives(assets):
    import importlib

    o = dict(x.split("=", 1) for x in bw.work_overrides(assets, TINY))
    module = importlib.import_module(o["reward.custom_reward_function.path"].removeprefix("pkg://"))
    assert getattr(module, o["reward.custom_reward_function.name"]) is wa.compute_score


def test_work_overrides_compose_and_pass_the_project_checks(assets):
    from tbrm_verl.config import check_config, compose, finish_config

    for method in ("method=tbrm", "method=ppo", "method=grpo"):
        cfg = compose([method, "profile=cpu", "data.train_batch_size=4", *bw.work_overrides(assets, TINY)])
        check_config(cfg)
        cfg = finish_config(cfg)
        assert cfg.actor_rollout_ref.rollout.response_length == TINY.response_tokens
        assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 4  # one optimizer step per batch


# ------------------------------------------------------------------------------------------ per-process memory

_CHILD = textwrap.dedent("""
    import ctypes, sys
    ctypes.CDLL(None).prctl(15, b"tbrm-base", 0, 0, 0)  # PR_SET_NAME: the sampler's baseline marker
    print("based", flush=True)
    sys.stdin.readline()
    buf = b"\\x01" * int(sys.argv[1])  # written, so every page is resident
    print("allocated", flush=True)
    sys.stdin.readline()
    del buf  # freed: RSS falls back, the peak must not
    print("freed", flush=True)
    sys.stdin.readline()
""")


def _wait(cond, timeout=30.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.02)


def _stats_of(sampler, pid):
    return next((s for s in list(sampler.procs.values()) if s.pid == pid), None)


def marked(title, name):
    return name == "tbrm-base"


def test_per_process_peak_above_baseline_is_what_each_child_allocated():
    sizes = [64 * MiB, 160 * MiB]
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(n)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for n in sizes]
    try:
        for c in children:
            assert c.stdout.readline().strip() == "based"
        with ProcessTreeSampler(os.getpid(), interval_s=0.05) as sampler:
            for c in children:  # baselines recorded before anything is allocated
                _wait(lambda: (s := _stats_of(sampler, c.pid)) is not None and s.first_where(marked) is not None)
            for c in children:
                c.stdin.write("go\n")
                c.stdin.flush()
                assert c.stdout.readline().strip() == "allocated"
            counts = [_stats_of(sampler, c.pid).n_samples for c in children]
            for c, n in zip(children, counts):  # sampled at least twice while allocated
                _wait(lambda: _stats_of(sampler, c.pid).n_samples >= n + 2)
            for c in children:
                c.stdin.write("go\n")
                c.stdin.flush()
                assert c.stdout.readline().strip() == "freed"
            counts = [_stats_of(sampler, c.pid).n_samples for c in children]
            for c, n in zip(children, counts):
                _wait(lambda: _stats_of(sampler, c.pid).n_samples >= n + 2)
        stats = [_stats_of(sampler, c.pid) for c in children]
    finally:
        for c in children:
            c.stdin.close()
            c.wait(timeout=30)
    above = {}
    for s, n in zip(stats, sizes):
        base = s.first_where(marked)
        assert base[3] == "tbrm-base"
        above[s.pid] = s.peak_rss - base[1]
        assert abs(above[s.pid] - n) < 6 * MiB, (above[s.pid] / MiB, n / MiB)
        assert s.last_rss < s.peak_rss - n // 2  # freed: only the peak remembers the allocation
        # the series keeps every sample within SERIES_STEP: its largest RSS is the peak, to that step
        assert s.peak_rss - max(x[1] for x in s.samples()) < 2 * MiB
    with_marker = [s for s in sampler.stats() if s.first_where(marked) is not None]
    assert {s.pid for s in with_marker} == {c.pid for c in children}  # pytest itself never had the marker name
    assert abs(sum(above.values()) - sum(sizes)) < 12 * MiB
    assert sampler.tree_peak >= sum(sizes)


# titles seen in a real run (Ray 2.60, verl 0.9.1, tiny work setting, PPO): `ps` shows what Ray's setproctitle wrote.
# title -> (role, is a baseline sample: the actor's __init__ or the actor idle, not a later method call)
REAL_TITLES = {
    "ray::BJLK64WorkerDict_0:0:WorkerDict.__init__": ("fsdp_worker", True),
    "ray::WorkerDict": ("fsdp_worker", True),
    "ray::WorkerDict.actor_rollout_ref_init_model": ("fsdp_worker", False),
    "ray::cpu_hf_server_0_0:CPURolloutServer.__init__": ("rollout_server", True),
    "ray::CPURolloutServer.generate": ("rollout_server", False),
    "ray::TBRMTaskRunner.run": ("other_actor", False),
    "ray::TransferQueueStorageUnit#0:SimpleStorageUnit.__init__": ("other_actor", True),
    "ray::agent_loop_worker_0_fdc28814:AgentLoopWorkerTQ.__init__": ("other_actor", True),
    "ray::IDLE": ("idle_worker", False),
    "/venv/bin/python /venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py --node-ip-address=x":
        ("runtime", False),
    "/venv/bin/python -m tbrm_verl.main method=ppo": ("runtime", False),
}


@pytest.mark.parametrize("title,expected", REAL_TITLES.items())
def test_roles_of_real_ray_titles(title, expected):
    assert (wm.role_of(title), wm.baseline_when(title)) == expected


def _ps(pid, samples):
    """ProcStats fed (title, rss) samples one second apart."""
    s = ProcStats(pid=pid, first_rss=samples[0][1], first_title=samples[0][0], first_t=0.0)
    for i, (title, rss) in enumerate(samples):
        s.add(float(i), int(rss), title, "python")
    return s


def test_baseline_is_the_actor_init_sample_or_the_last_one_before_a_missed_init():
    GB = 10**9
    seen_init = _ps(1, [("ray::IDLE", 0.1 * GB), ("ray::IDLE", 0.6 * GB), ("ray::a:0:WorkerDict.__init__", 0.65 * GB),
                        ("ray::WorkerDict.actor_rollout_ref_init_model", 1.5 * GB)])
    assert wm.baseline_of(seen_init) == ((2.0, int(0.65 * GB), "ray::a:0:WorkerDict.__init__", "python"), "actor_init")
    missed_init = _ps(2, [("ray::IDLE", 0.1 * GB), ("ray::IDLE", 0.62 * GB),
                          ("ray::WorkerDict.actor_rollout_ref_init_model", 1.0 * GB), ("ray::WorkerDict", 1.3 * GB)])
    assert wm.baseline_of(missed_init) == ((1.0, int(0.62 * GB), "ray::IDLE", "python"), "pre_actor")
    assert wm.baseline_of(_ps(3, [("ray::IDLE", 0.1 * GB)])) == (None, None)
    assert wm.baseline_of(_ps(4, [("/venv/bin/python -m tbrm_verl.main", 0.4 * GB)])) == (None, None)


def test_worker_memory_sums_training_state_over_fsdp_and_rollout_processes():
    GB = 10**9
    stats = [
        _ps(1, [("ray::IDLE", 0.1 * GB), ("ray::X_0:0:WorkerDict.__init__", 1 * GB), ("ray::WorkerDict.update_actor", 3 * GB),
                ("ray::WorkerDict", 2.5 * GB)]),
        _ps(2, [("ray::IDLE", 0.1 * GB), ("ray::s:CPURolloutServer.__init__", 1 * GB), ("ray::CPURolloutServer", 1.5 * GB)]),
        _ps(3, [("ray::IDLE", 0.1 * GB), ("ray::IDLE", 0.9 * GB), ("ray::TBRMTaskRunner.run", 1.2 * GB)]),
        _ps(4, [("ray::IDLE", 0.1 * GB), ("ray::IDLE", 0.2 * GB)]),
    ]
    m = wm.worker_memory(stats)
    assert m["train_engine_mem_gb"] == pytest.approx(2.0)
    assert m["rollout_server_mem_gb"] == pytest.approx(0.5)
    assert m["train_state_mem_gb"] == pytest.approx(2.5)
    assert m["roles"]["other_actor"]["above_baseline_gb"] == pytest.approx(0.3)  # pre_actor baseline 0.9
    assert m["roles"]["idle_worker"] == {"processes": 1, "above_baseline_gb": 0.0, "peak_rss_gb": pytest.approx(0.2)}


# ------------------------------------------------------------------------------------------ cpu_hf ignore_eos


class _EosModel:
    """Stands in for the HF model: every position's logits put all mass on token `eos`."""

    def __init__(self, vocab=8, eos=3):
        self.vocab, self.eos = vocab, eos

    def __call__(self, input_ids, **_):
        import torch

        logits = torch.full((*input_ids.shape, self.vocab), -50.0)
        logits[..., self.eos] = 50.0
        return SimpleNamespace(logits=logits)


def _server(ignore_eos: bool):
    from tbrm_verl.cpu.rollout import CPURolloutServer

    s = object.__new__(CPURolloutServer)
    s.config = SimpleNamespace(ignore_eos=ignore_eos, response_length=6, seed=0)
    s.model, s.eos_ids, s.pad_id = _EosModel(), {3}, 0
    s.max_model_len, s.base_seed, s.replica_rank, s.global_steps = 32, 0, 0, 1
    s._init_request_state()
    return s


@pytest.mark.parametrize("ignore_eos,expected_len", [(False, 1), (True, 6)])
def test_cpu_hf_rollout_samples_past_eos_only_with_ignore_eos(ignore_eos, expected_len):
    async def go():
        s = _server(ignore_eos)
        return await asyncio.gather(*(s.generate([5, 6, 7][: k + 1], {"temperature": 1.0}, f"r{k}") for k in range(2)))

    for out in asyncio.run(go()):
        assert out.token_ids == [3] * expected_len  # every sampled token is EOS; the flag decides where it stops


def test_request_flag_overrides_config():
    async def go():
        return await _server(ignore_eos=False).generate([5], {"ignore_eos": True, "max_tokens": 4}, "r")

    assert len(asyncio.run(go()).token_ids) == 4


# --------------------------------------------------------------------------------------- targets and dispatch


def test_targets_use_training_state_memory():
    res = {"tbrm_n1": {"step_time_s": 6.0, "peak_mem_gb": 9.0, "train_state_mem_gb": 1.2},
           "ppo_n1": {"step_time_s": 10.0, "peak_mem_gb": 10.0, "train_state_mem_gb": 2.0},
           "grpo_n4": {"step_time_s": 20.0, "peak_mem_gb": 10.0, "train_state_mem_gb": 2.0}}
    t = bw.check_targets(res)
    assert t["tbrm_n1 step time / ppo_n1"]["value"] == pytest.approx(0.6) and t["tbrm_n1 step time / ppo_n1"]["met"]
    assert t["tbrm_n1 step time / grpo_n4"]["value"] == pytest.approx(0.3) and t["tbrm_n1 step time / grpo_n4"]["met"]
    mem = t["tbrm_n1 training-state memory / ppo_n1"]
    assert mem["value"] == pytest.approx(0.6) and mem["met"] and mem["bound"] == 0.65
    assert bw.ratios(res)["tbrm_n1"]["peak_mem"] == pytest.approx(0.9)


def test_bench_dispatches_on_setting(monkeypatch):
    from tbrm_verl.tools import bench

    seen = []
    monkeypatch.setattr(bw, "main", lambda argv: seen.append(argv) or 0)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--setting", "work", "--steps", "3", "x=1"])
    assert exc.value.code == 0 and seen == [["--steps", "3", "x=1"]]

    class Embedded(Exception):
        pass

    def fake_run_method(name, overrides, out_dir, steps, common):
        raise Embedded((name, steps, common))

    monkeypatch.setattr(bench, "run_method", fake_run_method)
    with pytest.raises(Embedded) as e:  # no --setting: today's embedded bench, today's defaults
        bench.main(["--methods", "tbrm_n1"])
    assert e.value.args[0] == ("tbrm_n1", 6, ["data.train_batch_size=16"])
    assert seen == [["--steps", "3", "x=1"]]


@pytest.mark.e2e
def test_work_bench_smoke_tiny(tmp_path):
    """End to end at the tiny size, one method, 2 steps (~1.5 min on an idle 2-core machine)."""
    import json

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.bench", "--setting", "work", "--size", "tiny", "--steps", "2",
                        "--methods", "tbrm_n1", "--cache-dir", str(tmp_path / "assets"), "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    m = doc["methods"]["tbrm_n1"]
    assert m["step_time_s"] > 0 and m["parts"]["old_log_prob"] < 0.01 * m["step_time_s"]
    assert doc["setting"]["response_len"] == TINY.response_tokens  # ignore_eos: every answer at the cap
    assert doc["setting"]["prompt_len"] == TINY.prompt_tokens
    assert m["workers"]["fsdp_worker"]["processes"] == 1 and m["workers"]["rollout_server"]["processes"] == 1
    assert m["train_state_mem_gb"] == pytest.approx(m["train_engine_mem_gb"] + m["rollout_server_mem_gb"])
    assert all(p["baseline_title"] for p in m["processes"])
