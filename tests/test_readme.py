"""The README as a newcomer uses it: its request block, pasted line by line into bash against a
real server, leaves a valid PNG in out.png; its links (and the docs' links) lead somewhere."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from .conftest import LiveServer, make_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- request-block: tests/test_readme.py runs this block -->"
# Pages other branches add (ControlNet, model families, security); docs/README.md lists them already.
PENDING: set[str] = set()  # pages linked before they land (none now)


def request_block() -> str:
    text = README.read_text()
    assert MARK in text, "the README lost its request block's marker"
    m = re.search(re.escape(MARK) + r"\s*```bash\n(.*?)```", text, re.S)
    assert m, "no ```bash block right after the marker"
    return m.group(1)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_the_request_block_pasted_line_by_line_gives_a_png(model_store, tmp_path):
    for tool in ("curl", "jq", "base64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/system-deps.sh installs it)")
    block = request_block()
    assert "localhost:7866" in block
    with LiveServer(make_settings(model_store, tmp_path / "work")) as s:
        lines = block.replace("localhost:7866", f"127.0.0.1:{s.port}")
        # bash reads the block from stdin one line at a time, as a terminal paste does; -e and
        # pipefail make a line that fails (a 404, a jq error) fail the test instead of going on.
        r = subprocess.run(["bash", "-eo", "pipefail"], input=lines, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert s.client.get("/queue").json()["jobs"] == []  # the final answer was read, once
    out = tmp_path / "out.png"
    assert out.exists() and out.stat().st_size > 100, r.stdout + r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (512, 512)
        im.load()
    assert '"ok": true' in r.stdout.replace('"ok":true', '"ok": true')


def _links(path: Path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        yield target


def test_links_in_the_readme_and_docs_lead_to_files():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = []
    for page in pages:
        for target in _links(page):
            resolved = (page.parent / target).resolve()
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            if not resolved.exists() and rel not in PENDING:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
