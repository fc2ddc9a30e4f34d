"""Open a page in headless Chromium (Debian's `chromium`, which .ci/run installs) and read back what rendered."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# The network is closed: without the background-networking flags Chromium keeps trying to reach Google.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--allow-file-access-from-files",
]  # fmt: skip

# Runs in the page after load: which images decoded, which tables have rows, which sections exist.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.title = JSON.stringify({
    images: images.map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight})),
    tables: [...document.querySelectorAll("table")].map(t => t.querySelectorAll("tbody tr").length),
    sections: [...document.querySelectorAll("h2")].map(h => h.textContent),
    text: document.body.innerText.length,
  });
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("Chromium is not installed: `apt-get install chromium` (.ci/run does this)")
    return found


def rendered(page: Path) -> dict:
    """What the page showed once loaded: image sizes after decoding, table rows, section titles."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "page.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={scratch}/profile", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", result.stdout, re.S)
    assert title, f"Chromium printed no page (rc {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(title.group(1)))
