"""`stage=inspect`: a self-contained HTML page of the selected steps, with a summary and the agreement
between two selections."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from test_app import app

from atlas_exp.errors import AtlasError
from atlas_exp.report.inspect import agreement, jaccard
from atlas_exp.selectors.base import Selection, StepChoice


class _Page(HTMLParser):
    """Collects tags and classes, and checks that every opened element is closed in order."""

    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.classes: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.classes += (a.get("class") or "").split()
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack[-3:], tag)
        self.stack.pop()


def sel(id_, n, chosen):
    return Selection(id_, "x", 0.3, [StepChoice(k, 1.0 if k in chosen else 0.0, k in chosen) for k in range(n)])


def test_jaccard_and_agreement():
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    a = [sel("t1", 4, {0, 1}), sel("t2", 3, {2})]
    b = [sel("t2", 3, {2}), sel("t1", 4, {1, 2}), sel("t3", 2, {0})]
    ag = agreement(a, b, "other")
    assert ag.per_trajectory == {"t1": pytest.approx(1 / 3), "t2": 1.0}
    assert ag.mean == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(AtlasError, match="no trajectory in common"):
        agreement(a, [sel("zz", 2, {0})], "other")


def test_inspect_page_shows_selected_steps_summary_and_agreement(tmp_path, agenttraj_dir, smollm2_dir):
    data = ["data=local", f"data.path={agenttraj_dir / 'babyai.jsonl'}", "data.max_per_env=12"]
    a, b = tmp_path / "a", tmp_path / "b"
    for rd, selector in ((a, "random"), (b, "all")):
        for stage in ("data", "select"):
            p = app(f"run_dir={rd}", f"stage={stage}", f"selector={selector}", "ratio=0.3", *data)
            assert p.returncode == 0, p.stderr
    p = app(f"run_dir={a}", "stage=inspect", f"inspect.compare_to={b}", "inspect.sample=5", *data)
    assert p.returncode == 0, p.stderr
    page = (a / "inspect.html").read_text()

    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and parser.external == []  # well-formed, self-contained

    sels = [json.loads(line) for line in (a / "selection.jsonl").read_text().splitlines()]
    n_steps = sum(s["n_steps"] for s in sels)
    n_sel = sum(sum(c["selected"] for c in s["steps"]) for s in sels)
    assert f"<td class='l'>babyai</td><td>12</td><td>{n_steps}</td><td>{n_sel}</td><td>{n_sel / n_steps:.3f}</td>" in page
    assert "selected tokens" in page
    assert parser.classes.count("traj") == 5
    # every selected step of a shown trajectory is highlighted, and only those
    shown = [s for s in sels if f"id='{s['id']}'" in page]
    assert len(shown) == 5
    assert parser.classes.count("sel") == sum(sum(c["selected"] for c in s["steps"]) for s in shown)
    # against `all`, the Jaccard of a trajectory is (its selected steps) / (its steps)
    expected = sum(sum(c["selected"] for c in s["steps"]) / s["n_steps"] for s in sels) / len(sels)
    assert f"<b>{expected:.3f}</b>" in page
