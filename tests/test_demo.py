"""`proper demo` (seed-fixed): PROPER stage 3 beats every other row overall and on the users
with the sparsest histories, and stage 2's user-aware router recovers the latent groups."""

from proper.demo import DemoConfig, run


def test_stage3_beats_every_other_row_and_the_router_finds_the_groups(tmp_path):
    result = run(tmp_path, DemoConfig(progress=False), log=lambda line: None)
    table = result["results"]
    sparsest = next(iter(table["PROPER stage 3"]))  # buckets come in order: fewest records first
    assert sparsest == "1-4"
    for bucket in ("all", sparsest):
        best = table["PROPER stage 3"][bucket]["accuracy"]
        for name, rows in table.items():
            if name != "PROPER stage 3":
                assert best > rows[bucket]["accuracy"], (bucket, name, best, rows[bucket]["accuracy"])
    assert result["ari"] >= 0.8  # adjusted Rand index of argmax_e R[u, e] vs the true groups
    assert result["seconds"] < 600
