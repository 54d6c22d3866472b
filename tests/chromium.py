"""Open an HTML page in headless Chromium and report what its charts did (shared by tests).

A page's figures must actually render: each <img> decoded to a non-empty
image, each <svg> with a non-empty box. The check runs in the browser, on a
copy of the page with a small script added, and reads back its JSON.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install -y chromium chromium-driver"

_CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images
    .filter((i) => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0
                     && i.getBoundingClientRect().width > 0))
    .map((i) => i.alt || i.src.slice(0, 40));
  const svgs = Array.from(document.querySelectorAll("svg"));
  const emptySvgs = svgs.filter((s) => { const b = s.getBBox(); return !(b.width && b.height); });
  const out = document.createElement("pre");
  out.id = "chart-check";
  out.textContent = JSON.stringify(
    {images: images.length, svgs: svgs.length, broken: broken, empty_svgs: emptySvgs.length});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"headless Chromium is needed to check report.html's charts: {INSTALL_HINT}")


def rendered_charts(page: Path, scratch: Path) -> dict[str, object]:
    """Open a copy of `page` (plus a checking script) in headless Chromium; what it found."""
    probe = scratch / f"probe-{page.parent.name}-{page.name}"
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", _CHECK_SCRIPT + "</body>"),
        encoding="utf-8",
    )
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",  # tests run as root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={scratch / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r'<pre id="chart-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, (
        f"Chromium did not run the check (exit {result.returncode}): {result.stderr[-2000:]}"
    )
    return json.loads(html.unescape(found.group(1)))
