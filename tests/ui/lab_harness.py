"""A throw-away JupyterLab server and a headless Chromium for the browser tests.

Everything lives in one temporary folder (server root with *copies* of the
notebooks, Jupyter config/data/runtime dirs, JupyterLab settings and
workspaces, Chromium's profile) that the fixtures delete.  Autosave is off, so
the server never rewrites even the copies; the copies are what it serves.

Processes: the server runs in its own session; the kernels it starts are shut
down through its REST API, then the server gets SIGTERM (SIGKILL after a grace
period), then any process it started that is still alive is killed by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

INSTALL_HINT = (
    "install them with: apt-get update && apt-get install -y chromium chromium-driver "
    "&& .venv/bin/pip install selenium"
)

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--lang=en-US",
)

# JupyterLab settings for the test: never write the notebooks, never fetch news,
# keep every cell in the DOM (so the test can see all prompts and outputs).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromedriver_path() -> str | None:
    return shutil.which("chromedriver")


def missing_tools() -> str | None:
    """Why the browser test cannot run here, or None when everything it needs is installed."""
    missing = []
    if chromium_path() is None:
        missing.append("chromium")
    if chromedriver_path() is None:
        missing.append("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (Python package)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing.append("jupyterlab (Python package)")
    if not missing:
        return None
    return f"browser test needs {', '.join(missing)}; {INSTALL_HINT}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """``jupyter lab`` on 127.0.0.1 serving ``root``, with a known token and a private config."""

    def __init__(self, root: Path, home: Path, env: dict[str, str], token: str = "llmlab-ui-test-token") -> None:
        self.root, self.home, self.token = root, home, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "jupyter-server.log"
        self.env = dict(env)
        self.proc: subprocess.Popen | None = None
        self._children: dict[int, object] = {}

    def start(self, timeout: float = 90.0) -> None:
        settings_dir = self.home / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            path = settings_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        for sub in ("config", "data", "runtime", "ipython", "workspaces"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self.env.update(
            JUPYTER_CONFIG_DIR=str(self.home / "config"),
            JUPYTER_DATA_DIR=str(self.home / "data"),
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            IPYTHONDIR=str(self.home / "ipython"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.terminals_enabled=False",
            f"--LabApp.user_settings_dir={settings_dir}",
            f"--LabApp.workspaces_dir={self.home / 'workspaces'}",
            "--LabApp.expose_app_in_browser=True",
        ]
        if hasattr(os, "getuid") and os.getuid() == 0:
            cmd.append("--allow-root")
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = _deadline(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, method: str, path: str, timeout: float = 10):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def lab_url(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"

    def _remember_children(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        if self.proc is None:
            return
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._children[child.pid] = child
        except psutil.Error:
            pass

    def stop(self) -> None:
        """Shut the kernels down, stop the server, and kill whatever it started that is left."""
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            try:
                for kernel in self.api("GET", "/api/kernels") or []:
                    self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=20)
            except Exception:  # the server may be unhealthy; the signals below still stop it
                pass
            self._remember_children()
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        for child in self._children.values():
            try:
                if child.is_running():
                    child.kill()
                    child.wait(timeout=10)
            except Exception:
                pass
        self.proc = None


def make_driver(profile_dir: Path, log_path: Path, width: int = 1280, height: int = 720):
    """Headless Chromium through chromedriver, with the browser console log captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path()
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver_path(), log_output=str(log_path))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(90)
        driver.set_script_timeout(30)
        set_viewport(driver, width, height)
    except Exception:
        driver.quit()
        raise
    return driver


def set_viewport(driver, width: int, height: int) -> None:
    """Size the window so that the page itself (window.innerWidth × innerHeight) is ``width × height``."""
    driver.set_window_size(width, height)
    for _ in range(3):
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
        if inner == [width, height]:
            return
        size = driver.get_window_size()
        driver.set_window_size(size["width"] + width - inner[0], size["height"] + height - inner[1])


# --- talking to JupyterLab in the page (window.jupyterapp, exposed by --LabApp.expose_app_in_browser) ----

NOTEBOOK_STATE_JS = """
const app = window.jupyterapp;
if (!app || !app.shell) return {ready: false, why: 'no jupyterapp'};
let panel = app.shell.currentWidget;
if (!panel || !panel.content) {
    // Headless Chromium may never focus the window, and then JupyterLab tracks no current
    // widget: take the open notebook panel and activate it, so that commands act on it.
    for (const w of app.shell.widgets('main')) {
        if (w.content && w.sessionContext) panel = w;
    }
    if (panel && panel.id) app.shell.activateById(panel.id);
}
if (!panel || !panel.content || !panel.sessionContext || !panel.content.model)
    return {ready: false, why: 'no notebook panel'};
const session = panel.sessionContext.session;
const kernel = session && session.kernel;
const cells = panel.content.model.cells;
let code = 0, done = 0, errors = [];
for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code' || !cell.sharedModel.getSource().trim()) continue;
    code += 1;
    if (cell.executionCount) done += 1;
    const outputs = cell.outputs.toJSON();
    for (const out of outputs) {
        if (out.output_type === 'error') errors.push({cell: i, ename: out.ename, evalue: String(out.evalue).slice(0, 500)});
    }
}
const running = Array.from(panel.node.querySelectorAll('.jp-InputPrompt')).filter(
    p => p.textContent.includes('*')).length;
return {ready: true, path: panel.context.path, kernel: kernel ? kernel.status : null,
        code: code, done: done, running: running, errors: errors};
"""


_BUDGET_END: float | None = None


def start_budget(seconds: float) -> None:
    """Cap every later wait so that the whole session ends within ``seconds`` from now."""
    global _BUDGET_END
    _BUDGET_END = time.monotonic() + seconds


def _deadline(timeout: float) -> float:
    deadline = time.monotonic() + timeout
    return deadline if _BUDGET_END is None else min(deadline, _BUDGET_END)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``.

    The wait ends at ``timeout`` seconds or at the end of the budget (:func:`start_budget`), if sooner.
    """
    deadline = _deadline(timeout)
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as err:  # a stale element while the page re-renders: try again
            last = err
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (limit {timeout:.0f} s, or the test's overall budget; "
                       f"last: {last!r})")


def notebook_state(driver) -> dict:
    return driver.execute_script(NOTEBOOK_STATE_JS)


def open_notebook(driver, server: LabServer, path: str, timeout: float = 120) -> dict:
    """Open ``path`` (relative to the server root) and wait until its kernel is idle."""
    driver.get(server.lab_url(path))

    def ready():
        state = notebook_state(driver)
        return state if state.get("ready") and state.get("path") == path and state.get("kernel") == "idle" else None

    return wait_for(ready, timeout, f"{path} to open with an idle kernel")


def run_all(driver, timeout: float) -> dict:
    """Run every cell of the current notebook; return its state once the kernel is done."""
    # Not `return …execute(…)`: WebDriver waits for a returned promise, and this one resolves only
    # when every cell has run — longer than the script timeout.  The state polling below waits.
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return null;")
    time.sleep(1.0)

    def finished():
        state = notebook_state(driver)
        if state.get("kernel") != "idle" or state.get("running"):
            return None
        if state["errors"] or state["done"] == state["code"]:
            return state
        return None

    return wait_for(finished, timeout, "Run All to finish", interval=1.0)
