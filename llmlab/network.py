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


def fit_latency_bandwidth(message_bytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """The α–β model of a collective, ``seconds ≈ α + bytes / β``, fitted to measurements (notebook 12).

    Returns ``(α in seconds, β in bytes per second)``: α is the fixed cost of one call
    (latency, software, synchronisation), β the bandwidth large messages reach.  The
    fit minimises *relative* errors (least squares weighted by 1/seconds²), so a 64-byte
    message counts as much as a 64 MB one and α is not drowned by the large sizes.
    Give sizes spanning small and large messages, or the two cannot be told apart.
    """
    if len(message_bytes) != len(seconds) or len(message_bytes) < 2:
        raise ValueError("fit_latency_bandwidth needs at least two (bytes, seconds) pairs, as many of each.")
    if min(seconds) <= 0:
        raise ValueError("every measured time must be > 0 seconds.")
    weights = [1 / y**2 for y in seconds]
    total = sum(weights)
    mean_x = sum(w * x for w, x in zip(weights, message_bytes)) / total
    mean_y = sum(w * y for w, y in zip(weights, seconds)) / total
    spread = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, message_bytes))
    if spread == 0:
        raise ValueError("all messages have the same size: measure several sizes (e.g. 64 B … 64 MB).")
    slope = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, message_bytes, seconds)) / spread
    if slope <= 0:
        raise ValueError("the times do not grow with the size: measure larger messages, or repeat more.")
    return max(mean_y - slope * mean_x, 0.0), 1 / slope


def tp_seconds_per_token(config: ModelConfig, tp: int, over: Link | str | float, dtype: str = "bf16",
                         latency: float = 0.0, batch: int = 1) -> float:
    """Time the all-reduces of tensor parallelism add to one decode step of ``batch`` sequences (notebook 12).

    ``2 × n_layers`` all-reduces, each ``α + ring bytes / bandwidth`` (the ring moves
    2·(N−1)/N of a ``batch × d_model`` message per rank).  Nothing overlaps: this is
    the time a step waits on the link.
    """
    if tp == 1:
        return 0.0
    wire = ring_allreduce_bytes(batch * tp_allreduce_bytes_per_token(config, dtype), tp)
    return 2 * config.n_layers * latency + transfer_seconds(wire, over)


def tp_bandwidth_needed(config: ModelConfig, tp: int, tokens_per_second: float, share: float = 0.1,
                        dtype: str = "bf16", latency: float = 0.0, batch: int = 1) -> float:
    """Bytes per second a link needs so that TP's all-reduces take at most ``share`` of each decode step
    at ``tokens_per_second`` per sequence (notebook 12); ``inf`` when the latency alone exceeds the budget."""
    if tp == 1:
        return 0.0
    budget = share / tokens_per_second - 2 * config.n_layers * latency
    if budget <= 0:
        return float("inf")
    return ring_allreduce_bytes(batch * tp_allreduce_bytes_per_token(config, dtype), tp) / budget
