"""``llmlab serve --tp 2`` under torchrun: rank 0 serves HTTP, rank 1 follows, idle heartbeats are skipped.

Slow (two ranks each import torch and FastAPI, ~20-30 s on two busy cores), so marked ``slow``.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmlab.checkpoint import load_checkpoint
from llmlab.engine import Engine
from llmlab.parallel.launch import free_port
from llmlab.sampling import SamplingParams

pytestmark = pytest.mark.slow


def test_serve_on_two_tensor_parallel_ranks():
    ckpt = load_checkpoint()
    prompt = ckpt.tokenizer.encode("ROMEO:")
    alone = list(Engine(ckpt.model).stream(prompt, SamplingParams(temperature=0, max_new_tokens=12)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LLMLAB_SERVE_HEARTBEAT_S": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "llmlab", "serve", "--tp", "2", "--port", "0",
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        url = re.search(r"http://127\.0\.0\.1:\d+", lines.get(timeout=180)).group(0)
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert first["usage"]["completion_tokens"] == len(alone)
        assert first["choices"][0]["text"] == ckpt.tokenizer.decode(alone)
        time.sleep(1.0)  # ~10 heartbeats while idle: rank 1 must skip them and still follow
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches every process of the group
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stderr = proc.stderr.read()
    assert "llmlab serve: stopped" in stderr
    assert "llmlab serve: error" not in stderr and "ProcessGroup" not in stderr
