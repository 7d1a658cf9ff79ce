"""One rank of tests/extension/test_lean_v.py::test_two_fsdp2_ranks_equal_one_process_full_batch (run by torch.distributed.run).

The tiny Qwen2 is wrapped as verl's FSDP2 engine wraps it (verl.utils.fsdp_utils.apply_fsdp2: decoder layers, an
untied lm_head and embed_tokens each their own unit, then the root; reshard after forward; gradient checkpointing as
verl enables it). Each rank runs verl's `forward_step` + backward on its own micro-batches of a 6-sequence batch,
once with the lean V(s_1) (TBRMEngine) and once with the logits hook (verl's engine); rank 0 saves the
rank-averaged loss and the full gradients for the test to compare with one process on the whole batch.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: str, tie: bool) -> None:
    spec = importlib.util.spec_from_file_location("test_lean_v", Path(__file__).with_name("test_lean_v.py"))
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
    from verl.utils.fsdp_utils import apply_fsdp2
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    model = t.tiny_qwen2(tie)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
    apply_fsdp2(model, {"mesh": mesh, "mp_policy": mp, "offload_policy": None, "reshard_after_forward": True}, {})

    b = t._batch(seed=6)
    splits = [[[0, 1], [2]], [[3], [4, 5]]][rank]
    result = {"lm_head_is_own_fsdp_unit": isinstance(model.lm_head, FSDPModule)}
    for path, cls, flags in (("lean", t.TBRMEngine, t.LEAN), ("hook", FSDPEngineWithLMHead, t.HOOK)):
        for p in model.parameters():
            p.grad = None
        eng = t._engine(cls, model)
        eng.ulysses_device_mesh = None  # data-parallel group = WORLD
        eng._autocast_dtype = torch.float32
        total = torch.zeros(())
        for idx in splits:
            td = t._td(b, idx, flags, dp_size=world, global_bs=6)
            loss, _ = eng.forward_step(td, loss_function=t.loss_fn, forward_only=False)
            loss.backward()
            total += loss.detach()
        dist.all_reduce(total, op=dist.ReduceOp.AVG)  # as verl's TrainingWorker reports the loss
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        result[path] = (total.item(), grads)
    if rank == 0:
        torch.save(result, Path(out_dir) / "ranks.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
