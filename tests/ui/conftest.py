"""Browser tests: a real JupyterLab in headless Chromium (run them with ``pytest tests/ui``).

They need Debian's ``chromium`` and ``chromium-driver`` and the ``selenium``
package, and skip (saying how to install them) where any is missing.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ui: drives JupyterLab in a headless browser (pytest tests/ui)")
