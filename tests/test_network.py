"""Links and collectives (llmlab.network) reproduce the figures in FACTS.md."""

from __future__ import annotations

import pytest

from llmlab import get_config, network


def test_links_are_the_published_peaks():
    assert network.LINKS["PCIe 4.0 x16"].bytes_per_s == 32e9
    assert network.LINKS["NVLink 4 (H100)"].bytes_per_s * 2 == 900e9
    assert network.LINKS["NVLink 5 (B200)"].bytes_per_s * 2 == 1.8e12
    assert network.LINKS["InfiniBand NDR"].bytes_per_s == 400e9 / 8
    assert network.LINKS["InfiniBand XDR"].bytes_per_s == 800e9 / 8
    assert network.LINKS["100 GbE"].bytes_per_s == 100e9 / 8
    assert network.HBM_BANDWIDTH["H100 SXM"] == 3.35e12


def test_transfer_time():
    assert network.transfer_seconds(14e9, "PCIe 4.0 x16") == pytest.approx(14e9 / 32e9)
    assert network.link("100 GbE").seconds(12.5e9) == pytest.approx(1.0)
    assert network.transfer_seconds(10, 5.0) == 2.0
    with pytest.raises(ValueError, match="unknown link 'carrier pigeon'"):
        network.transfer_seconds(1, "carrier pigeon")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        network.transfer_seconds(1, 0.0)
    with pytest.raises(ValueError, match="n_bytes must be ≥ 0"):
        network.transfer_seconds(-1, "100 GbE")


def test_collectives():
    assert network.ring_allreduce_bytes(1000, 1) == 0
    assert network.ring_allreduce_bytes(1000, 2) == 1000
    assert network.ring_allreduce_bytes(800, 8) == pytest.approx(1400)
    assert network.all_to_all_bytes(800, 8) == pytest.approx(700)
    with pytest.raises(ValueError):
        network.ring_allreduce_bytes(1, 0)


def test_tensor_parallel_bytes_for_llama3_70b():
    per_token = network.tp_allreduce_bytes_per_token(get_config("llama3-70b"), "bf16")
    assert per_token / 80 == 32 * 1024  # 32 KiB per layer per token
    assert round(per_token / 1e6, 1) == 2.6


def test_gib_vs_gb():
    assert 81_559 * 2**20 == pytest.approx(85.5e9, rel=1e-3)
    assert network.GiB == 1_073_741_824


# -- notebook 12: the α–β model and tensor parallelism's link time ----------------------------------


def test_alpha_beta_fit_recovers_a_known_link():
    from llmlab.network import fit_latency_bandwidth

    sizes = [64 * 4**k for k in range(11)]  # 64 B … 64 MiB
    alpha, beta = fit_latency_bandwidth(sizes, [20e-6 + size / 12.5e9 for size in sizes])
    assert alpha == pytest.approx(20e-6, rel=1e-9)
    assert beta == pytest.approx(12.5e9, rel=1e-9)


def test_alpha_beta_fit_refuses_what_it_cannot_fit():
    from llmlab.network import fit_latency_bandwidth

    with pytest.raises(ValueError, match="at least two"):
        fit_latency_bandwidth([64], [1e-5])
    with pytest.raises(ValueError, match="same size"):
        fit_latency_bandwidth([64, 64], [1e-5, 2e-5])
    with pytest.raises(ValueError, match="do not grow"):
        fit_latency_bandwidth([64, 1e6], [1e-3, 1e-4])


def test_tp_link_time_per_token_for_llama3_70b_on_nvlink():
    from llmlab.network import GB, tp_seconds_per_token

    config = get_config("llama3-70b")
    per_token = 2 * 80 * 8192 * 2  # two bf16 hidden vectors per layer
    wire = per_token * 2 * 7 / 8  # ring all-reduce over 8 GPUs
    assert tp_seconds_per_token(config, 8, "NVLink 4 (H100)") == pytest.approx(wire / (450 * GB), rel=1e-12)
    assert tp_seconds_per_token(config, 8, "NVLink 4 (H100)", latency=5e-6) == pytest.approx(
        wire / (450 * GB) + 160 * 5e-6, rel=1e-12)
    assert tp_seconds_per_token(config, 1, "100 GbE") == 0


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_bandwidth_needed_is_the_inverse_of_the_link_time(tp):
    from llmlab.network import tp_bandwidth_needed, tp_seconds_per_token

    config = get_config("llama3-8b")
    need = tp_bandwidth_needed(config, tp, tokens_per_second=50, share=0.1, latency=2e-6, batch=8)
    assert tp_seconds_per_token(config, tp, need, latency=2e-6, batch=8) == pytest.approx(0.1 / 50, rel=1e-9)
    assert tp_bandwidth_needed(config, tp, tokens_per_second=1e6, latency=1e-3) == float("inf")
