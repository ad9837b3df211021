"""The device's ceilings, measured in the same run as the benchmarks: a large matrix product in the benchmarks'
dtype (compute) and a large memory copy (bandwidth)."""
import torch

from fastseq2seq.benchmarks.timing import Candidate, time_alternating

# (matrix size n, copy size in MiB) per device type and run length: large enough to reach the device's peak.
SIZES = {("cuda", False): (8192, 2048), ("cuda", True): (4096, 1024),
         ("cpu", False): (2048, 512), ("cpu", True): (1536, 256)}


def measure_ceilings(device, dtype, *, quick=False) -> dict:
    """{'flops_per_s', 'bytes_per_s', 'matmul', 'copy'}: the best of several timed runs (a ceiling is what the
    device can reach, so the fastest run is the estimate, unlike the medians of the benchmarks)."""
    device = torch.device(device)
    n, copy_mib = SIZES[(device.type, quick)]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    source = torch.rand(copy_mib * 2 ** 20 // 4, device=device)
    target = torch.empty_like(source)
    stats, _ = time_alternating([{"matmul": Candidate(lambda: a @ b), "copy": Candidate(lambda: target.copy_(source))}],
                                device, repeats=5 if quick else 10, min_repeats=3, warmup=2)
    return {"flops_per_s": 2 * n ** 3 / (stats["matmul"]["min_ms"] / 1e3),
            "bytes_per_s": 2 * source.numel() * 4 / (stats["copy"]["min_ms"] / 1e3),  # read and write
            "matmul": f"{n}x{n} @ {n}x{n}, {str(dtype).replace('torch.', '')}",
            "copy": f"{copy_mib} MiB copied (read + write)"}
