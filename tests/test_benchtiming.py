"""The bench's timing API: variants run interleaved in rounds, medians and spread reported."""

from __future__ import annotations

from vlmtune.benchtiming import Variant, interleave, median, paired_ratio, ratio, round_ratios, timing_row


def test_interleave_runs_variants_in_turn_and_reports_medians() -> None:
    order: list[str] = []
    calls = {"a": 0, "b": 0}

    def run(name: str):
        def f() -> dict[str, int]:
            order.append(name)
            calls[name] += 1
            return {"n": calls[name]}

        return f

    setups: list[str] = []
    t = interleave([Variant("a", run("a"), lambda: setups.append("a")), Variant("b", run("b"))], rounds=3)
    # Every other round in reverse: a steady change of load falls on both alike.
    assert order == ["a", "b", "b", "a", "a", "b"] and setups == ["a"] * 3
    assert [x["n"] for x in t["a"].extra] == [1, 2, 3]
    t["a"].wall, t["b"].wall = [1.0, 3.0, 2.0], [4.0, 5.0, 9.0]
    assert ratio(t, "a", "b") == 2.0 / 5.0
    assert round_ratios(t, "a", "b") == [1.0 / 4.0, 3.0 / 5.0, 2.0 / 9.0]
    assert paired_ratio(t, "a", "b") == 1.0 / 4.0  # the median of the per-round ratios
    row = timing_row(t["b"])
    assert (row["wall_s"], row["wall_min_s"], row["wall_max_s"], row["rounds"]) == (5.0, 4.0, 9.0, 3)
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
