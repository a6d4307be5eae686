"""The page's files keep to the rules its safety rests on, so a later edit cannot slip past
the browser tests: text goes in as text, HTML only into the sandboxed frame, no inline code."""

from __future__ import annotations

import re

from api.web import STATIC, page_files

HTML_SINKS = re.compile(r"\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\s*\(|new Function)\b")


def test_no_script_inserts_html_or_evaluates_text() -> None:
    scripts = sorted(STATIC.glob("*.js"))
    assert scripts
    found = [
        f"{p.name}:{n}: {line.strip()}"
        for p in scripts
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HTML_SINKS.search(line)
    ]
    assert found == []


def test_html_outputs_go_only_into_a_frame_sandboxed_to_nothing() -> None:
    uses = [
        (p.name, line.strip()) for p in STATIC.glob("*.js") for line in p.read_text().splitlines() if "srcdoc" in line
    ]
    assert uses == [("outputs.js", "frame.srcdoc = inertHtml(html);")]
    assert 'h("iframe", { sandbox: ""' in (STATIC / "outputs.js").read_text()


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() -> None:
    for name, f in page_files().items():
        text = f.path.read_text(errors="replace")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, name
        if name.endswith(".html"):
            assert re.findall(r"<script(?![^>]*\bsrc=)", text) == [], name
            assert " style=" not in text, name
            assert not re.search(r"<[^>]+\son[a-z]+=", text), name
