"""Links, memories and collectives: the network half of the infrastructure lens.

Taught from notebook 00 (the links beside the memory tiers), then used wherever
bytes cross a wire: 06b (expert parallelism's all-to-all), 07 (data parallelism's
gradient all-reduce), 09 (moving a KV cache from a prefill machine to a decode
machine), and notebook 12 (tensor parallelism), which measures what these
formulas predict.

Every bandwidth here is a vendor's **peak** figure, per direction unless said;
real transfers reach less. Sizes use GB = 10⁹ bytes (``GB``) and GiB = 2³⁰ bytes
(``GiB``): an "80 GB" H100 shows 81,559 MiB in ``nvidia-smi``, about 85.5e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.calc import dtype_bytes
from llmlab.config import ModelConfig

GB = 1e9
"""A gigabyte: 10⁹ bytes (what vendors print on memory and links)."""

GiB = 2**30
"""A gibibyte: 2³⁰ = 1,073,741,824 bytes (what ``nvidia-smi`` and operating systems count in)."""


@dataclass(frozen=True)
class Link:
    """A link between devices or machines, with its peak bandwidth in bytes per second, one direction."""

    name: str
    bytes_per_s: float
    where: str

    def seconds(self, n_bytes: float) -> float:
        """Time to send ``n_bytes`` one way at peak bandwidth (no latency, no protocol overhead)."""
        return transfer_seconds(n_bytes, self)


LINKS: dict[str, Link] = {
    link.name: link
    for link in [
        Link("PCIe 4.0 x16", 32 * GB, "CPU ↔ GPU, GPU ↔ NIC"),
        Link("PCIe 5.0 x16", 64 * GB, "CPU ↔ GPU, GPU ↔ NIC"),
        Link("NVLink 4 (H100)", 450 * GB, "GPU ↔ GPU in a node (900 GB/s both ways)"),
        Link("NVLink 5 (B200)", 900 * GB, "GPU ↔ GPU in a node (1.8 TB/s both ways)"),
        Link("InfiniBand NDR", 50 * GB, "node ↔ node (400 Gb/s per port)"),
        Link("InfiniBand XDR", 100 * GB, "node ↔ node (800 Gb/s per port)"),
        Link("100 GbE", 12.5 * GB, "node ↔ node, Ethernet"),
        Link("400 GbE", 50 * GB, "node ↔ node, Ethernet"),
    ]
}
"""Peak per-direction bandwidths of the links a serving or training cluster uses (FACTS.md)."""

HBM_BANDWIDTH: dict[str, float] = {
    "A100 80 GB": 2.0e12,
    "H100 SXM": 3.35e12,
    "H200": 4.8e12,
}
"""Peak HBM bandwidth of common GPUs, bytes per second (to compare with the links)."""


def link(name: str) -> Link:
    """The link called ``name`` (one of :data:`LINKS`), with an error that lists them otherwise."""
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}: use one of {', '.join(LINKS)}.")
    return LINKS[name]


def transfer_seconds(n_bytes: float, over: Link | str | float) -> float:
    """Seconds to move ``n_bytes`` at a link's peak bandwidth (a ``Link``, its name, or bytes per second)."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be ≥ 0, got {n_bytes}.")
    if isinstance(over, str):
        over = link(over)
    rate = over.bytes_per_s if isinstance(over, Link) else float(over)
    if not rate > 0:
        raise ValueError(f"bandwidth must be > 0 bytes per second, got {rate}.")
    return n_bytes / rate


def ring_allreduce_bytes(message_bytes: float, n_ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``message_bytes``: 2·(N−1)/N · M.

    A reduce-scatter (N−1 steps of M/N) followed by an all-gather (N−1 steps of M/N).
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be ≥ 1, got {n_ranks}.")
    return 2 * (n_ranks - 1) / n_ranks * message_bytes


def all_to_all_bytes(bytes_per_rank: float, n_ranks: int) -> float:
    """Bytes each rank sends in an all-to-all where it holds ``bytes_per_rank`` spread evenly over N ranks.

    The 1/N share addressed to itself stays local: (N−1)/N of it crosses the wire.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be ≥ 1, got {n_ranks}.")
    return (n_ranks - 1) / n_ranks * bytes_per_rank


def tp_allreduce_bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> float:
    """Bytes that tensor parallelism all-reduces per token, over all layers, before the ring factor.

    Two all-reduces per layer (after attention, after the MLP), each of one hidden vector:
    Llama-3-70B in bf16 gives 2 × 8,192 × 2 B = 32 KiB per layer, about 2.6 MB per token.
    """
    return 2 * config.n_layers * config.d_model * dtype_bytes(dtype)
