"""Reports: the numbers appear, tables are well formed, HTML parses and is self-contained."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

from dmea_dist.evaluation.report import format_matrix_table, render_html, render_markdown

NAN = float("nan")
NAMES = ["rnnlg.restaurant", "e2e", "synth.travel.03"]
R = np.array([
    [80.0, NAN, NAN],
    [75.0, 70.0, NAN],
    [72.5, 68.25, 90.0],
])
SIMILARITY = np.array([
    [NAN, NAN, NAN],
    [0.8, NAN, NAN],
    [0.3, 0.625, NAN],
])
PATHS = {"rnnlg.restaurant": [0, 0, 0], "e2e": [1, 0, 1], "synth.travel.03": [1, 2, 0]}
METRICS = {"final_average": 76.916667, "bwt": -4.875, "forgetting": 4.875}
VOID = {"meta", "br", "hr", "img", "link", "input"}


class _TableCollector(HTMLParser):
    """Checks tag nesting and records, per table id, the rows of cell (attrs, text)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self.table_id: str | None = None
        self.cell: tuple[dict, list[str]] | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self.table_id = attrs.get("id")
            self.tables[self.table_id] = []
        elif tag == "tr":
            self.tables[self.table_id].append([])
        elif tag in ("td", "th"):
            self.cell = (attrs, [])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            attrs, text = self.cell
            self.tables[self.table_id][-1].append((attrs, "".join(text)))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1].append(data)


def _parse(page: str) -> _TableCollector:
    parser = _TableCollector()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def _heat_cells(parser, table_id):
    return [[c for c in row if c[0].get("class") == "heat"] for row in parser.tables[table_id][1:]]


def _expected_cells(matrix, precision):
    return [["-" if np.isnan(v) else f"{v:.{precision}f}" for v in row] for row in matrix]


# ----------------------------------------------------------------- terminal
def test_format_matrix_table_is_aligned_with_dashes_for_nan():
    text = format_matrix_table(NAMES, R)
    lines = text.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[1].split() == ["0", "rnnlg.restaurant", "80.0", "-", "-"]
    assert lines[3].split() == ["2", "synth.travel.03", "72.5", "68.2", "90.0"]
    # Every value column ends at the same offset in every line.
    ends = [[m.end() for m in re.finditer(r"\S+", line)][-3:] for line in lines]
    assert all(e == ends[0] for e in ends)


# ----------------------------------------------------------------- Markdown
def test_markdown_contains_every_number_and_well_formed_tables():
    text = render_markdown(NAMES, R, METRICS, similarity=SIMILARITY, paths=PATHS,
                           notes={"e2e": "noisy | refs"})
    assert "| final_average | 76.92 |" in text
    assert "| e2e | 75.00 | 70.00 | - |" in text
    assert "| synth.travel.03 | 0.300 | 0.625 | - |" in text
    # per task: own score, final, change, new modules, note (pipe escaped)
    assert "| e2e | 70.00 | 68.25 | -1.75 | 2 | noisy \\| refs |" in text
    assert "| e2e | **1** | 0 | **1** | 2 |" in text
    assert "| synth.travel.03 | 1 | **2** | 0 | 1 |" in text
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:  # every row of a table has as many unescaped pipes as its header
            counts = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
            assert len(counts) == 1, block


def test_markdown_without_optional_parts():
    text = render_markdown(NAMES, R, {"final_average": 76.9})
    assert "Task similarity" not in text and "## Paths" not in text
    assert "new modules" not in text


# --------------------------------------------------------------------- HTML
def test_html_parses_with_one_cell_per_entry():
    page = render_html(NAMES, R, METRICS, similarity=SIMILARITY, paths=PATHS)
    parser = _parse(page)
    for table_id, matrix, precision in (("scores", R, 2), ("similarity", SIMILARITY, 3)):
        cells = _heat_cells(parser, table_id)
        assert [len(row) for row in cells] == [3, 3, 3]
        assert [[text for _, text in row] for row in cells] == _expected_cells(matrix, precision)
        for row, values in zip(cells, matrix, strict=True):
            for (attrs, _), value in zip(row, values, strict=True):
                assert re.search(r"background:#[0-9a-f]{6}", attrs["style"])
                assert ("#e0e0e0" in attrs["style"]) == bool(np.isnan(value))
    metrics = {row[0][1]: row[1][1] for row in parser.tables["metrics"][1:]}
    assert metrics == {"final_average": "76.92", "bwt": "-4.88", "forgetting": "4.88"}


def test_html_heatmap_darker_for_higher_scores():
    parser = _parse(render_html(NAMES, R, METRICS))
    shade = {}
    for row, values in zip(_heat_cells(parser, "scores"), R, strict=True):
        for (attrs, _), value in zip(row, values, strict=True):
            if not np.isnan(value):
                hex_colour = re.search(r"background:#([0-9a-f]{6})", attrs["style"]).group(1)
                shade[value] = sum(int(hex_colour[k : k + 2], 16) for k in (0, 2, 4))
    ordered = [shade[v] for v in sorted(shade)]
    assert ordered == sorted(ordered, reverse=True)


def test_html_is_self_contained_and_escaped():
    names = ["<b>x</b>", "e2e"]
    page = render_html(names, [[1.0, NAN], [0.5, 2.0]], {"a": 1.0},
                       notes={"e2e": "<script>alert(1)</script>"})
    parser = _parse(page)
    assert "script" not in parser.tags and "b" not in parser.tags
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert not re.search(r"(src|href)=|https?://|@import", page)


def test_html_paths_table_marks_new_modules():
    parser = _parse(render_html(NAMES, R, METRICS, paths=PATHS))
    rows = parser.tables["paths"]
    assert [text for _, text in rows[0]] == ["task", "L0", "L1", "L2", "new"]
    assert [[text for _, text in row] for row in rows[1:]] == [
        ["rnnlg.restaurant", "0", "0", "0", "3"],
        ["e2e", "1", "0", "1", "2"],
        ["synth.travel.03", "1", "2", "0", "1"],
    ]
    assert "<strong>2</strong>" in render_html(NAMES, R, METRICS, paths=PATHS)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("render", [render_markdown, render_html])
def test_bad_inputs_are_named(render):
    with pytest.raises(ValueError, match=r"3 tasks"):
        render(NAMES, np.zeros((2, 2)), {})
    with pytest.raises(ValueError, match="similarity"):
        render(NAMES, R, {}, similarity=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="unknown task names.*'nope'"):
        render(NAMES, R, {}, paths={"nope": [0, 0, 0]})
    with pytest.raises(ValueError, match="lengths differ"):
        render(NAMES, R, {}, paths={"e2e": [0, 0], "rnnlg.restaurant": [0, 0, 0]})
    with pytest.raises(ValueError, match="unique; repeated: e2e"):
        render(["e2e", "e2e", "x"], R, {})
