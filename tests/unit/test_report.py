"""Text blocks of reports: the terminal's R table, and the escaping helpers the report pages are built with."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dmea_dist.evaluation.report import _html_table, _md, _md_table, format_matrix_table

NAN = float("nan")
NAMES = ["rnnlg.restaurant", "e2e", "synth.travel.03"]
R = np.array([
    [80.0, NAN, NAN],
    [75.0, 70.0, NAN],
    [72.5, 68.25, 90.0],
])


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


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"3 tasks"):
        format_matrix_table(NAMES, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="unique; repeated: e2e"):
        format_matrix_table(["e2e", "e2e", "x"], R)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        format_matrix_table([], np.zeros((0, 0)))


# ------------------------------------------------------------- escaping helpers
@pytest.mark.parametrize("text, shown", [
    ("a | b", r"a \| b"),  # a pipe would end the table cell
    ("<b>x</b> & y", r"\<b\>x\</b\> \& y"),  # raw HTML and entities
    ("*z* `c` [l](x) ~~s~~ $x$", r"\*z\* \`c\` \[l\](x) \~\~s\~\~ \$x\$"),
    ("line\nbreak", "line break"),  # one line: a break would end the table row
    ("snake_case _edge_", r"snake_case \_edge\_"),  # `_` only where it can open emphasis
])
def test_markdown_text_is_escaped_to_show_as_written(text, shown):
    assert _md(text) == shown


def test_markdown_table_rows_have_as_many_cells_as_the_header():
    lines = _md_table(["task", "note"], [[_md("e2e"), _md("noisy | refs")], [_md("a|b"), _md("")]])
    assert lines[:2] == ["| task | note |", "|---|---|"]
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in lines} == {3}


def test_html_table_marks_the_name_column():
    out = "\n".join(_html_table("t", ["task", "score"], [["e2e", "70.0"]]))
    assert out == ('<table id="t">\n<tr><th class="name">task</th><th>score</th></tr>\n'
                   '<tr><td class="name">e2e</td><td>70.0</td></tr>\n</table>')
