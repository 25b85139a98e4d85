import pandas as pd
import plotly.graph_objects as go

from safety_circuits.report import write_report


def test_report_is_self_contained(tmp_path):
    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    path = write_report(
        tmp_path / "r.html", "T <1>", [("Numbers", [pd.DataFrame({"a": [0.5]}), "a & b", fig, fig])]
    )
    text = path.read_text()
    assert "T &lt;1&gt;" in text and "a &amp; b" in text and "<table" in text
    assert text.count("plotly.js v") == 1 and 'src="http' not in text  # inlined once, offline
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
