"""
Where a script runs (train.py, eval.py, bench.py): the device and torchrun's process group, autocast, rank-0 printing.
"""
import gc
import os
import sys
import traceback
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist
# DDP imports torch.distributed.nn, which binds the default process group into default arguments: imported after
# init_process_group, it keeps gloo's threads alive into interpreter shutdown (SIGABRT). Imported first, it binds None.
import torch.distributed.nn  # noqa: F401


def init_compute(device: str) -> tuple[bool, int, int, str]:
    """(ddp, rank, world_size, device); under torchrun a rank takes its GPU (NCCL) or a share of the cores (gloo)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one store across --max-restarts: a restart must not read the last attempt's addresses
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank,
                                world_size=world_size)
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # free speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world_size, device


def set_cpu_threads(device: str) -> int:
    """One thread on a CPU unless OMP_NUM_THREADS or OMP_WAIT_POLICY=PASSIVE is set: spinning OpenMP threads wait for
    any descheduled one (beside a CPU hog the tiny run made 89-105 videos/s with 2 threads, 175-195 with one;
    docs/performance.md)."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ and not passive:
        if torch.get_num_threads() > 1:
            print0(f"cpu: 1 thread of {torch.get_num_threads()} (spinning OpenMP threads stall when the cores are "
                   f"shared); OMP_WAIT_POLICY=PASSIVE python ... uses them all")
        torch.set_num_threads(1)
    return torch.get_num_threads()


def cleanup_compute():
    """End the process group while every rank is alive: gloo's threads left to interpreter shutdown abort it. The
    frames an exception left hold the DDP wrapper, and so the group: their locals are cleared first."""
    if dist.is_available() and dist.is_initialized():
        traceback.clear_frames(sys.exc_info()[2])
        gc.collect()  # the DDP wrapper can sit in reference cycles
        with suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def autocast(device: str, dtype: str | None):
    """bf16/fp16 autocast on the device's type, or nothing for "float32" or None."""
    if dtype in (None, "float32"):
        return nullcontext()
    return torch.amp.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def is_master() -> bool:
    ddp = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if ddp else int(os.environ.get("RANK", 0))) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


# dense bf16/fp16 tensor-core peaks in FLOP/s, by a part of the device name
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
               "4090": 165e12, "3090": 71e12, "V100": 125e12, "A6000": 155e12}


def peak_flops(device_type: str) -> float | None:
    """The GPU's peak for MFU; None on a CPU (MFU is left out) or an unknown GPU."""
    name = torch.cuda.get_device_name() if device_type == "cuda" else ""
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def run_script(main):
    """main(); bad input (a ValueError or FileNotFoundError) ends with one `error: ...` line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
