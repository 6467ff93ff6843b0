"""benchmarks/run.py rewrites RESULTS.md: rerun sections replaced in place, everything else kept."""

from benchmarks.run import SUMMARY, Goal, Outcome, Section, render, split_sections

OLD = f"""# Benchmark results

old header

## {SUMMARY}

| benchmark | goal | measured | status | cause when missed |
|---|---|---|---|---|
| train_step | dense MFU >= 50% | 41% | **not met** | old |
| soak | no leak over 20 min | 0.1 MiB/h | met |  |

## Train step

old train-step table

## Soak test

hand-written soak results

## clipup-demo

demo table
"""
HEADER = dict(date="2026-11-29", seconds="1.0 min", cpu="2 cores", load="0.0", os="Linux", python="3.11",
              versions="jax 0.10.2")


def test_rerun_sections_are_replaced_and_the_rest_kept():
    new = Section("Train step", "new train-step table", [Goal("dense MFU >= 50%", "55%", True),
                                                        Goal("sparse MFU >= 40%", "35%", False, "dispatch")])
    peer = Section("Against a peer", "peer table", [Goal("train vs HF >= 1.2x", "1.5x", True)])
    failed = Outcome("scaling", 3.0, None, "exit code 1: boom")
    text = render(OLD, [Outcome("train_step", 10.0, new), Outcome("peer", 5.0, peer), failed],
                  {"peer": [Goal("input >= consumption", "10x", None)]}, HEADER, "python -m benchmarks.run", False)
    head, sections = split_sections(text)
    titles = [t for t, _ in sections]
    # Summary first, old order kept, the new section appended, nothing duplicated.
    assert titles == [SUMMARY, "Train step", "Soak test", "clipup-demo", "Against a peer"]
    body = dict(sections)
    assert "new train-step table" in body["Train step"] and "old train-step" not in text
    assert "hand-written soak results" in body["Soak test"] and "demo table" in body["clipup-demo"]
    summary = body[SUMMARY]
    assert "| train_step | dense MFU >= 50% | 55% | met |" in summary
    assert "| train_step | sparse MFU >= 40% | 35% | **not met** | dispatch |" in summary
    assert "| peer | input >= consumption | 10x | reported |" in summary
    assert "| soak | no leak over 20 min | 0.1 MiB/h | met |" in summary  # not rerun: kept
    assert "41%" not in summary  # the stale train_step row is gone
    assert "`scaling`: exit code 1: boom" in summary
    assert "python -m benchmarks.run" in head and "2 cores" in head
