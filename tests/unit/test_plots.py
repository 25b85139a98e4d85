import pandas as pd
import plotly.graph_objects as go

from safety_circuits import plots
from safety_circuits.neurons import NeuronSet


def test_figures(make_subject):
    arch = make_subject("llama").arch
    a = NeuronSet(arch, {(0, "ffn"): [1, 2, 3], (1, "q"): [0, 5]}, name="a")
    b = NeuronSet(arch, {(0, "ffn"): [3, 4], (1, "k"): [1]}, name="b")
    bars = plots.neurons_per_layer(a)
    assert isinstance(bars, go.Figure) and sum(sum(t.y) for t in bars.data) == len(a)
    share = plots.attention_vs_ffn({"a": a, "b": b})
    assert {t.name for t in share.data} == {"attention", "ffn"}
    assert plots.attention_vs_ffn(a, normalise=True).data
    heat = plots.overlap_heatmap({"a": a, "b": b})
    z = heat.data[0].z
    assert z[0][0] == z[1][1] == 1 and z[0][1] == a.overlap(b)
    curve = pd.DataFrame({"fraction": [0.01, 0.001], "asr": [0.9, 0.2]})
    assert list(plots.asr_curve(curve).data[0].x) == [0.001, 0.01]
    sweep = pd.DataFrame({"side": ["first", "last"], "layers": [1, 1], "asr": [0.5, 0.1]})
    assert len(plots.layer_curve(sweep).data) == 2
    assert plots.table(pd.DataFrame({"n": [1, 2], "x": [0.5, 0.25]}), "t").data[0].cells.values
