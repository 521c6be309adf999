"""The explorers of notebooks 01 and 08 in a real JupyterLab, driven by headless Chromium.

For each notebook the test copies it from ``course/`` (whatever is current),
strips its widget outputs as ``make notebooks`` does, and serves the copy:

1. opened without running, it shows the static preview, never a widget repr
   (``VBox(children=…``) or "Error displaying widget";
2. after Run All (``LLMLAB_FAST=1``, offline caches from the root conftest),
   the live explorer replaces the preview and reacts to the keyboard: typing
   re-tokenizes (notebook 01), slider keys change the bars (notebook 08);
3. the sampling explorer fits a 1280×720 projector and its slider row wraps
   rather than overflowing at 150% zoom; text is ≥ 16 px, token ids ≥ 13 px;
4. the browser console has no SEVERE entry (see ``HARMLESS_CONSOLE``).

Run All goes through JupyterLab's own command (``notebook:run-all-cells`` on
``window.jupyterapp``, exposed by ``--LabApp.expose_app_in_browser``); the
widgets are driven with real key presses.  Every wait is explicit and the whole
module shares one time budget (``BUDGET``).

Run with ``pytest tests/ui`` (marker ``ui``).  ``LLMLAB_UI_COURSE=<dir>``
serves the notebooks of another folder; ``LLMLAB_UI_SCREENSHOTS=<dir>``
saves screenshots at each step.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from lab_harness import (
    LabServer, make_driver, missing_tools, open_notebook, run_all, set_viewport, start_budget, wait_for,
)

pytestmark = pytest.mark.ui

REPO = Path(__file__).resolve().parents[2]
COURSE = Path(os.environ.get("LLMLAB_UI_COURSE", REPO / "course"))
TOKENS_NB = "01_tokenization.ipynb"
SAMPLING_NB = "08_generation.ipynb"
BUDGET = 240  # seconds for the whole module (server, browser, both notebooks); it takes ~50 s here
RUN_ALL_TIMEOUT = 150  # seconds per notebook's Run All; ~10-20 s each on a shared 2-core CPU
WIDGET_TIMEOUT = 30  # seconds for the kernel to answer one widget change
PROJECTOR = (1280, 720)

HARMLESS_CONSOLE: list[re.Pattern] = [
    # None needed with JupyterLab 4.6 / ipywidgets 8.1: the console shows only DEBUG lines and one
    # WARNING ("Disabling terminals plugin", as the test server turns terminals off).
    # Add a pattern here only for an entry that is clearly harmless, with the reason beside it.
]
"""Console SEVERE entries that are not failures, each with the reason it is harmless."""

_reason = missing_tools()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from llmlab.strip_widgets import strip_file  # noqa: E402
from llmlab.widgets import ID_FONT_PX, PREVIEW_CAPTION, piece_label  # noqa: E402


# --- fixtures: one server and one browser for the module, always torn down ---------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A server root holding stripped copies of the two notebooks, a figures/ dir, and tool dirs."""
    top = tmp_path_factory.mktemp("ui")
    root = top / "root"
    (root / "course").mkdir(parents=True)
    (root / "figures").mkdir()
    for name in (TOKENS_NB, SAMPLING_NB):
        copy = root / "course" / name
        shutil.copy(COURSE / name, copy)
        strip_file(copy)  # as `make notebooks` leaves them
        _clear_execution_counts(copy)
    return top


def _clear_execution_counts(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = None
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = None
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(workspace):
    env = dict(os.environ)  # carries TIKTOKEN_CACHE_DIR / LLMLAB_CACHE_DIR from the root conftest
    env.update(LLMLAB_FAST="1", LLMLAB_FIGURES_DIR=str(workspace / "root" / "figures"))
    server = LabServer(workspace / "root", workspace / "home", env)
    start_budget(BUDGET)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(lab, workspace):
    driver = make_driver(workspace / "chromium-profile", workspace / "chromedriver.log", *PROJECTOR)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def console(browser):
    """Yields; then fails the test on SEVERE browser-console entries that are not known-harmless."""
    browser.get_log("browser")  # drop what earlier tests left
    yield
    entries = browser.get_log("browser")
    severe = [e for e in entries if e.get("level") == "SEVERE"
              and not any(p.search(e.get("message", "")) for p in HARMLESS_CONSOLE)]
    assert not severe, "browser console errors:\n" + "\n".join(e["message"][:500] for e in severe)


# --- helpers -------------------------------------------------------------------------------------


def shot(driver, name: str) -> None:
    folder = os.environ.get("LLMLAB_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def output_text(driver) -> str:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))"
        ".map(e => e.innerText).join('\\n');")


def previews(driver):
    return [e for e in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output")
            if PREVIEW_CAPTION in (e.get_attribute("textContent") or "")]


def check_unrun_notebook(driver, name: str) -> None:
    """Opened without running: the static preview shows, and no dead widget."""
    text = output_text(driver)
    assert "VBox(children" not in text and "Error displaying widget" not in text, text[:2000]
    shown = [p for p in previews(driver) if p.is_displayed()]
    assert shown, (f"{name} opened without running shows no static preview ({PREVIEW_CAPTION!r}); "
                   "re-execute it with the current llmlab.widgets and strip it (make notebooks)")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", shown[0])
    shot(driver, f"{name[:2]}-unrun-preview")
    # JupyterLab's own styles for HTML tables (12 px) must not shrink the preview's text.
    sizes = driver.execute_script(
        "return Array.from(arguments[0].querySelectorAll('*')).filter(e => Array.from(e.childNodes).some("
        "n => n.nodeType === 3 && n.textContent.trim())).map(e => [parseFloat(getComputedStyle(e).fontSize),"
        " e.textContent.slice(0, 40)]);", shown[0])
    small = [(size, text) for size, text in sizes if size < ID_FONT_PX and PREVIEW_CAPTION not in text]
    assert not small, f"preview text under {ID_FONT_PX} px: {small[:5]}"


def run_notebook(driver, name: str) -> None:
    state = run_all(driver, RUN_ALL_TIMEOUT)
    assert not state["errors"], f"{name}: cells failed under Run All: {state['errors']}"
    assert state["done"] == state["code"], state


def px(driver, element, prop: str) -> float:
    value = driver.execute_script(f"return getComputedStyle(arguments[0])['{prop}'];", element)
    return float(value.removesuffix("px")) if value.endswith("px") else float("nan")


def rect(driver, element) -> dict:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom,"
                                 " width: r.width, height: r.height};", element)


def press(driver, element, *keys) -> None:
    """Focus ``element`` and press ``keys`` as a user would."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", element)
    actions = ActionChains(driver)
    for key in keys:
        actions.send_keys(key)
    actions.perform()


def token_blocks(explorer) -> dict[str, dict]:
    """Each tokenizer's block: name → its pieces (as shown), and its summary line."""
    blocks = {}
    for block in explorer.find_elements(By.CSS_SELECTOR, ".widget-html, .jupyter-widget-html"):
        names = block.find_elements(By.TAG_NAME, "b")
        if not names:
            continue
        pieces = [p.get_attribute("textContent") for p in block.find_elements(By.CSS_SELECTOR, ".llmlab-piece")]
        summary = block.find_element(By.CSS_SELECTOR, ".llmlab-token-summary").get_attribute("textContent")
        blocks[names[0].get_attribute("textContent")] = {"pieces": pieces, "summary": summary}
    return blocks


# --- the tests -----------------------------------------------------------------------------------


def test_token_explorer_retokenizes_what_is_typed(browser, lab, console):
    path = f"course/{TOKENS_NB}"
    open_notebook(browser, lab, path)
    check_unrun_notebook(browser, TOKENS_NB)

    run_notebook(browser, TOKENS_NB)
    explorer = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".llmlab-token-explorer"),
                        WIDGET_TIMEOUT, "the live token explorer")
    wait_for(lambda: explorer.find_elements(By.CSS_SELECTOR, ".llmlab-token"), WIDGET_TIMEOUT, "token chips")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer)
    shot(browser, "01-live")
    assert not any(p.is_displayed() for p in previews(browser)), "the static preview still shows beside the live widget"

    before = token_blocks(explorer)
    assert len(before) >= 2, before
    piece = explorer.find_element(By.CSS_SELECTOR, ".llmlab-piece")
    token_id = explorer.find_element(By.CSS_SELECTOR, ".llmlab-token-id")
    assert px(browser, piece, "fontSize") >= 16 and px(browser, token_id, "fontSize") >= ID_FONT_PX

    typed = "Ping 192.168.0.1 네트워크 latency"
    box = explorer.find_element(By.CSS_SELECTOR, "textarea")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(typed)
    wait_for(lambda: box.get_property("value") == typed, WIDGET_TIMEOUT, "the typed text in the box")

    def retokenized():
        blocks = token_blocks(explorer)
        ok = all(b["summary"].startswith(f"{len(b['pieces'])} tokens · {len(typed)} characters")
                 for b in blocks.values())
        return blocks if ok and blocks.keys() == before.keys() else None

    after = wait_for(retokenized, WIDGET_TIMEOUT, "every tokenizer to re-tokenize the typed text")
    shot(browser, "01-typed")
    for name, block in after.items():
        assert block["pieces"] != before[name]["pieces"], name
        assert "".join(block["pieces"]).startswith("Ping·"), block["pieces"]  # spaces show as ·
    gpt2_name = next((n for n in after if n.startswith("GPT-2")), None)
    if gpt2_name is not None:  # GPT-2's pieces are known exactly: compare with the package's own
        from llmlab.tokenizer import gpt2_tokenizer

        gpt2 = gpt2_tokenizer()
        expected = [piece_label(gpt2.decode_bytes([i])) for i in gpt2.encode(typed)]
        assert after[gpt2_name]["pieces"] == expected
        assert any(p.startswith("⟨") for p in expected)  # Korean bytes show as ⟨EB ..⟩ chips


def test_sampling_explorer_follows_its_sliders(browser, lab, console):
    path = f"course/{SAMPLING_NB}"
    open_notebook(browser, lab, path)
    check_unrun_notebook(browser, SAMPLING_NB)

    run_notebook(browser, SAMPLING_NB)
    explorer = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".llmlab-sampling-explorer"),
                        WIDGET_TIMEOUT, "the live sampling explorer")
    title = wait_for(lambda: explorer.find_element(By.CSS_SELECTOR, ".llmlab-bars-title"), WIDGET_TIMEOUT,
                     "the bars")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer)
    shot(browser, "08-live")
    assert not any(p.is_displayed() for p in previews(browser)), "the static preview still shows beside the live widget"

    # Fits a 1280×720 projector at 100%, with readable text and single-spaced continuation lines.
    height = rect(browser, explorer)["height"]
    print(f"sampling explorer: {height:.0f} px tall in a {PROJECTOR[0]}x{PROJECTOR[1]} viewport")
    assert height <= 650, f"the sampling explorer is {height:.0f} px tall (more than 650)"
    label = explorer.find_element(By.CSS_SELECTOR, ".llmlab-temperature .widget-label")
    assert px(browser, title, "fontSize") >= 16 and px(browser, label, "fontSize") >= 16
    text = explorer.find_element(By.CSS_SELECTOR, ".llmlab-continuation")
    assert px(browser, text, "lineHeight") <= 1.5 * px(browser, text, "fontSize")

    rows = explorer.find_elements(By.CSS_SELECTOR, "tr.llmlab-bar")
    n_rows = len(rows)
    assert n_rows >= 5 and "top-k off" in title.text, title.text

    def title_has(*parts):
        def check():
            element = explorer.find_element(By.CSS_SELECTOR, ".llmlab-bars-title")
            return element if all(p in element.text for p in parts) else None
        return check

    # top-k: three steps right from "off" are 1, 2, 3 — small values are one key press apart.
    handle = explorer.find_element(By.CSS_SELECTOR, ".llmlab-top-k .noUi-handle")
    press(browser, handle, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    wait_for(title_has("top-k 3 ", " 3 of "), WIDGET_TIMEOUT, "top-k 3 in the bars' title")
    removed = explorer.find_elements(By.CSS_SELECTOR, "tr.llmlab-bar.llmlab-removed")
    assert len(removed) == n_rows - 3
    readout = explorer.find_element(By.CSS_SELECTOR, ".llmlab-top-k .widget-readout")
    assert readout.text.strip() == "3"
    shot(browser, "08-top-k-3")

    # temperature: Home takes it to 0, which is greedy — one token can be drawn.
    handle = explorer.find_element(By.CSS_SELECTOR, ".llmlab-temperature .noUi-handle")
    press(browser, handle, Keys.HOME)
    wait_for(title_has("greedy (argmax)", " 1 of "), WIDGET_TIMEOUT, "greedy in the bars' title")
    assert len(explorer.find_elements(By.CSS_SELECTOR, "tr.llmlab-bar.llmlab-removed")) == n_rows - 1
    shot(browser, "08-greedy")

    # 150% zoom on a 1280×720 screen is a 853×480 CSS-px viewport: the slider row wraps, nothing is cut.
    # (JupyterLab's file browser stays open, as it does for a learner who zooms in.)
    try:
        set_viewport(browser, PROJECTOR[0] * 2 // 3, PROJECTOR[1] * 2 // 3)
        time.sleep(1.0)
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer)
        area = explorer.find_element(By.XPATH, "./ancestor::div[contains(@class, 'jp-OutputArea-output')]")
        outer = rect(browser, area)
        row = explorer.find_element(By.CSS_SELECTOR, ".llmlab-controls")
        for control in row.find_elements(By.XPATH, "./*"):
            r = rect(browser, control)
            assert r["right"] <= outer["right"] + 1, (control.get_attribute("class"), r, outer)
        top_p = rect(browser, explorer.find_element(By.CSS_SELECTOR, ".llmlab-top-p .widget-readout"))
        assert top_p["width"] > 0 and top_p["right"] <= outer["right"] + 1, (top_p, outer)
        title = rect(browser, explorer.find_element(By.CSS_SELECTOR, ".llmlab-bars-title"))
        assert title["right"] <= outer["right"] + 1, (title, outer)  # the title wraps, it is not cut
        shot(browser, "08-zoom150")
    finally:
        set_viewport(browser, *PROJECTOR)
