"""Corpus download (served for real on 127.0.0.1), checksum, cache, offline errors; batches."""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest
import torch

from llmlab import data
from llmlab.data import ChecksumError, DataError, DownloadError

SHA = data.CORPORA["tinyshakespeare"].sha256


@pytest.fixture
def server(shared_data):
    """Serve ../shared/data over HTTP on a free loopback port, as `python -m http.server` would."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_checks_and_caches(server, cache):
    text = data.load_corpus(url=f"{server}/tinyshakespeare.txt")
    assert text.startswith("First Citizen:")
    assert len(text.encode()) == 1_115_394
    cached = cache / "tinyshakespeare.txt"
    assert data.sha256_of(cached) == SHA
    # Cached: a dead address is not even asked.
    assert data.load_corpus(url=f"http://127.0.0.1:{closed_port()}/x") == text


def test_wrong_checksum_keeps_nothing(server, cache):
    with pytest.raises(ChecksumError, match="expected 0000"):
        data.download(f"{server}/tinyshakespeare.txt", cache / "t.txt", sha256="0000")
    assert not any(cache.iterdir())


def test_damaged_cache_is_fetched_again(server, cache):
    cache.mkdir(parents=True)
    (cache / "tinyshakespeare.txt").write_text("damaged")
    text = data.load_corpus(url=f"{server}/tinyshakespeare.txt")
    assert text.startswith("First Citizen:")


def test_failed_download_keeps_the_good_file(server, cache):
    good = data.download(f"{server}/tinyshakespeare.txt", cache / "t.txt", sha256=SHA)
    with pytest.raises(DownloadError):
        data.download(f"{server}/missing.txt", good, sha256=SHA)
    assert data.sha256_of(good) == SHA


def test_unreachable_host_says_what_to_do(cache):
    with pytest.raises(DownloadError) as info:
        data.load_corpus(url=f"http://127.0.0.1:{closed_port()}/tinyshakespeare.txt")
    message = str(info.value)
    assert "could not download" in message and "path=" in message
    assert not cache.exists() or not any(cache.iterdir())


def test_local_path_and_errors(shared_data, tmp_path):
    assert data.load_corpus(path=shared_data / "tinyshakespeare.txt").startswith("First Citizen:")
    with pytest.raises(DataError, match="no corpus file"):
        data.load_corpus(path=tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="known corpora"):
        data.load_corpus("wikitext")


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv(data.CACHE_ENV)
    assert "llmlab" in str(data.cache_dir())


def test_random_batch_is_shifted_by_one():
    ids = torch.arange(100)
    x, y = data.random_batch(ids, batch_size=4, block_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    x2, _ = data.random_batch(ids, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        data.random_batch(torch.arange(8), 2, 8)


def test_train_val_split():
    train, val = data.train_val_split(torch.arange(100), 0.1)
    assert len(train) == 90 and len(val) == 10 and val[0] == 90
    with pytest.raises(ValueError, match="val_fraction"):
        data.train_val_split(torch.arange(10), 1.5)
