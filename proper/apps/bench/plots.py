"""PNG plots of the op level's sweeps: time of one layer call against the number of tokens,
of distinct users in the batch and of experts (on CUDA also peak memory against tokens)."""

from __future__ import annotations

from pathlib import Path


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    xkey = {"tokens": "tokens", "users": "users", "experts": "experts"}
    metrics = [("median_ms", "time of one layer call (ms)", "")]
    if result["device"]["type"] == "cuda":
        metrics.append(("peak_mib", "peak memory (MiB)", "-memory"))
    for metric, ylabel, suffix in metrics:
        for sweep, key in xkey.items():
            if suffix and sweep != "tokens":
                continue
            rows = [r for r in result["rows"] if r["level"] == "op" and r["sweep"] == sweep]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in dict.fromkeys(r["variant"] for r in rows):
                pts = sorted((r["shape"][key], r[metric]) for r in rows if r["variant"] == variant
                             and r[metric] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel({"tokens": "tokens in the batch", "users": "distinct users in the batch",
                           "experts": "experts"}[sweep])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{result['device']['name'][:48]}, {rows[0]['dtype']}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = stem.parent / f"{stem.name}-{sweep}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
