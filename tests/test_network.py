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
