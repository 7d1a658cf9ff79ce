"""Generation backends for the evaluation: ``hf`` (transformers ``generate``; tiny models on CPU, tests) and ``vllm``.

``vllm``: ``LLM.generate`` with ``SamplingParams(n=k, temperature, top_p, max_tokens, seed)``, one request per
problem, seeded with ``--seed`` + the problem's row. ``hf``: one ``generate()`` call per batch of problems, seeded with
the batch's first request seed, through ``hf_sample`` (also the sampler of the embedded task's accuracy check).
``--backend auto`` takes vllm when it is importable and a GPU is visible. Generation stops at the tokenizer's /
generation config's EOS tokens and at ``<|im_end|>`` when the tokenizer has it (``im_end_stop``), or after
``max_new_tokens``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tbrm_verl.eval import EvalError, log

IM_END = "<|im_end|>"


@dataclass
class GenRequest:
    prompt_ids: list[int]
    k: int
    temperature: float
    seed: int


@dataclass
class Generation:
    texts: list[str]
    finish: list[str] = field(default_factory=list)  # "stop" | "length" per sample


def _stop_token_ids(tokenizer, model_path: str, im_end_stop: bool) -> list[int]:
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    try:
        from transformers import GenerationConfig

        g = GenerationConfig.from_pretrained(model_path).eos_token_id
        for e in g if isinstance(g, (list, tuple)) else [g]:
            if e is not None:
                ids.add(int(e))
    except Exception:  # no generation_config.json  # noqa: BLE001
        pass
    if im_end_stop and IM_END in tokenizer.get_vocab():
        ids.add(int(tokenizer.convert_tokens_to_ids(IM_END)))
    return sorted(ids)


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt token ids as verl renders them: chat template text (generation prompt added), then tokenized
    without extra special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a tokenizer without a template (not the case for Qwen2.5-Math): plain concatenation
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_sample(model, prompts: list[list[int]], *, k: int = 1, temperature: float, top_p: float = 1.0,
              max_new_tokens: int, stop_ids: list[int], pad_id: int, seed: int,
              device: str | None = None) -> list[tuple[list[int], bool]]:
    """k samples per prompt from one ``model.generate`` call (left padding, KV cache), prompt-major.

    temperature > 0: multinomial sampling at that temperature and `top_p`, no top-k, no repetition penalty (set
    explicitly: a model's generation_config.json may carry its own); 0: greedy. The global torch RNG is seeded with
    `seed` inside a fork, so the caller's RNG state is left as it was. Returns, for each of the len(prompts) * k
    samples, (tokens before the first stop id, whether a stop id ended it)."""
    import torch

    dev = torch.device(device) if device else model.device
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_return_sequences=k, eos_token_id=list(stop_ids),
                              pad_token_id=pad_id, repetition_penalty=1.0)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: no top-k
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[] if dev.type == "cpu" else None):
        torch.manual_seed(seed)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), **kw)
    out = []
    for g in seqs[:, L:].tolist():
        cut = next((j for j, t in enumerate(g) if t in stop_ids), None)
        out.append((g if cut is None else g[:cut], cut is not None))
    return out


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 2048,
                 top_p: float = 1.0, im_end_stop: bool = True, device: str | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.batch_size, self.max_new_tokens, self.top_p = batch_size, max_new_tokens, top_p
        self.stop_ids = _stop_token_ids(self.tokenizer, model_path, im_end_stop)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])

    def generate(self, requests: list[GenRequest], desc: str = "") -> list[Generation]:
        out: list[Generation] = []
        try:
            from tqdm import tqdm
        except ImportError:  # progress is optional
            tqdm = None
        # requests of one set share k and temperature: one generate() call per batch of problems, in row order
        batches = [requests[i: i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        it = tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False) if tqdm else batches
        for batch in it:
            k, temp = batch[0].k, batch[0].temperature
            assert all(r.k == k and r.temperature == temp for r in batch)
            samples = hf_sample(self.model, [r.prompt_ids for r in batch], k=k, temperature=temp, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                seed=batch[0].seed, device=self.device)
            for i in range(len(batch)):
                mine = samples[i * k:(i + 1) * k]
                out.append(Generation([self.tokenizer.decode(toks, skip_special_tokens=True) for toks, _ in mine],
                                      ["stop" if stopped else "length" for _, stopped in mine]))
        return out


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "auto", max_new_tokens: int = 2048, top_p: float = 1.0,
                 im_end_stop: bool = True, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise EvalError(f"--backend vllm: vllm is not importable ({e}); install the gpu extra or use "
                            "--backend hf") from None
        from transformers import AutoTokenizer

        self.SamplingParams = SamplingParams
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_new_tokens, self.top_p = max_new_tokens, top_p
        self.stop_ids = _stop_token_ids(self.tokenizer, model_path, im_end_stop)
        kw: dict[str, Any] = dict(model=model_path, tokenizer=model_path, dtype=dtype,
                                  tensor_parallel_size=tensor_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)

    def generate(self, requests: list[GenRequest], desc: str = "") -> list[Generation]:
        params = [
            self.SamplingParams(n=r.k, temperature=r.temperature, top_p=self.top_p if r.temperature > 0 else 1.0,
                                max_tokens=self.max_new_tokens, seed=r.seed, stop_token_ids=list(self.stop_ids),
                                skip_special_tokens=True)
            for r in requests
        ]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        log(f"{desc}: vLLM generating {sum(r.k for r in requests)} samples for {len(requests)} problems")
        results = self.llm.generate(prompts, sampling_params=params, use_tqdm=True)
        out = []
        for r, res in zip(requests, results):
            if len(res.outputs) != r.k:
                raise EvalError(f"vLLM returned {len(res.outputs)} samples for a request of n={r.k}")
            out.append(Generation([o.text for o in res.outputs],
                                  ["length" if o.finish_reason == "length" else "stop" for o in res.outputs]))
        return out


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def make_backend(args, model_path: str):
    """The backend `args` (the ``run`` command's options) ask for; ``auto``: vllm if usable, else hf."""
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if _vllm_usable() else "hf"
    if backend == "vllm":
        return VLLMBackend(model_path, dtype=args.dtype, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                           im_end_stop=args.im_end_stop, tensor_parallel_size=args.tensor_parallel_size,
                           gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                           seed=args.seed)
    return HFBackend(model_path, dtype=args.dtype, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     top_p=args.top_p, im_end_stop=args.im_end_stop, threads=args.threads)
