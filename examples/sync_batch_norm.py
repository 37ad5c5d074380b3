"""Data-parallel training with bn_ext.SyncBatchNorm, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 examples/sync_batch_norm.py

Each rank holds a different number of samples; the BatchNorm statistics are those of the whole
batch across ranks. Run without torchrun it trains in one process (no collectives).
"""

import gc
import os

import torch
import torch.distributed as dist

import bn_ext


def main(steps: int = 3) -> None:
    distributed = "RANK" in os.environ
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    model = bn_ext.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    torch.manual_seed(100 + rank)  # each rank its own data, and its own batch size
    batch = 2 + 3 * rank
    for step in range(steps):
        x = torch.randn(batch, 3, 32, 32, device=device)
        target = torch.randint(0, 10, (batch,), device=device)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} (rank 0, batch {batch})")

    bn = next(m for m in model.modules() if isinstance(m, bn_ext.SyncBatchNorm))
    if distributed:
        every = [torch.empty_like(bn.running_mean) for _ in range(world)]
        dist.all_gather(every, bn.running_mean)
        same = all(torch.equal(t, every[0]) for t in every)
        if rank == 0:
            print(f"running stats identical on all {world} ranks: {same}")
        # DDP's reducer holds the group: release it before destroying the group, or its threads
        # may outlive the group and abort the process at exit (seen with gloo on torch 2.14).
        # DDP sits in reference cycles, so `del` alone leaves it to the collector, which then
        # ran during interpreter shutdown: a gloo thread freeing its last work item could no
        # longer take the GIL and aborted the process (about 1 run in 20). Collect it here.
        del model, opt, bn
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    else:
        print("one process: SyncBatchNorm ran as a plain BatchNorm")


if __name__ == "__main__":
    main()
