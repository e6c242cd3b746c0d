"""The manual (README.md and docs/): every link resolves, every reslab command in it parses with today's CLI, the
site builds with mkdocs --strict, and the tutorial notebook runs and shows its figures in a browser."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(title: str) -> str:
    """A heading's anchor as MkDocs (Python-Markdown's toc) makes it."""
    title = re.sub(r"[^\w\s-]", "", re.sub(r"`", "", title)).strip().lower()
    return re.sub(r"[-\s]+", "-", title)


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_every_link_in_the_readme_and_the_docs_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^(https?|mailto):", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _commands() -> list[tuple[str, str]]:
    """(page, command) for every reslab command in a bash block of the README and the docs (continued lines
    joined; torchrun's ``-m reslab`` included)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                for part in line.split(" && "):
                    words = shlex.split(part) if part else []
                    if words[:1] == ["reslab"]:
                        found.append((page.name, words[1:]))
                    elif "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["reslab"]:
                        found.append((page.name, words[words.index("-m") + 2:]))
    return found


def test_every_reslab_command_in_the_docs_parses_with_todays_cli(tmp_path, monkeypatch):
    """What tests/test_readme.py does not run (GPUs, several machines, hours of CIFAR-10) is still parsed by the
    real parser, so a renamed or removed option in the manual fails here."""
    from reslab.cli import commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("lr: 0.05\n")  # the --config example's file

    commands_seen = _commands()
    assert len(commands_seen) >= 40, len(commands_seen)
    bad = []
    for page, args in commands_seen:
        args = [a for a in args if not (a.startswith("[") or a.endswith("]"))]  # [--optional] placeholders
        try:
            commands._parse(args)
        except (SystemExit, Exception):  # a usage error exits 2; a bad --config raises
            bad.append(f"{page}: reslab {shlex.join(args)}")
    assert not bad, "\n".join(bad)


def test_the_tutorial_notebook_runs_and_its_figures_load_in_the_built_site(tmp_path):
    """The seed tutorial as a notebook, run on small samples (``RESLAB_TUTORIAL=small``), then the site built with
    mkdocs --strict and the tutorial page opened in headless Chromium: every figure decodes."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data = os.environ.get("RESLAB_CIFAR10_DIR")
    if not data or not Path(data).is_dir():
        pytest.skip("the tutorial reads CIFAR-10 images: set RESLAB_CIFAR10_DIR (CI does)")
    nb = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    env = {"RESLAB_TUTORIAL": "small", "RESLAB_TUTORIAL_RUNS": str(tmp_path / "runs")}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k in env:
            os.environ.pop(k)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 4, len(figures)  # augmentation grid, the two loss curves, confusion matrix, depth
    text = "".join(o.get("text", "") for o in outputs)
    assert "test accuracy" in text and "resnet56 ends with" in text  # the depth lesson, in words
    _open_the_built_tutorial(tmp_path)


def _open_the_built_tutorial(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    page = site / "tutorial" / "index.html"
    html = page.read_text()
    images = len(re.findall(r"<img ", html))
    assert images >= 4 and "residual" in html
    from test_insight import _chromium

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (CI installs one)")
    # The page itself, with a script that counts its decoded images once it has loaded.
    probe = page.with_name("probe.html")
    probe.write_text(html.replace("</body>", "<script>addEventListener('load', () => { const i = [...document."
                                  "images]; document.body.dataset.images = i.filter(x => x.complete && "
                                  "x.naturalWidth > 0).length + '/' + i.length; });</script></body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
                          "--dump-dom", f"file://{probe}"], capture_output=True, text=True, timeout=120)
    counted = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert counted and counted.group(1) == counted.group(2) and int(counted.group(2)) >= 4, dom.stdout[-2000:]
