"""benchmarks/lease_cache.py: a Triton cache compiled here and carried to a GPU machine is
found there. The group files are rewritten to the new place, the IR files dropped, a key
re-keyed only when libtriton.so alone differs; and, compiled for real (no GPU, no
interpreter), a moved and installed cache is a hit."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest

from benchmarks import lease_cache

ROOT = Path(__file__).resolve().parents[1]
KEY = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST"


def fake_entry(root: Path, old_root: Optional[Path] = None, name: str = "_k") -> Path:
    """A cache entry as Triton writes it, its group naming `old_root` (default: a place that
    is gone, as after a copy)."""
    old_root = old_root or root.parent / "gone"
    entry = root / KEY
    entry.mkdir(parents=True)
    children = {}
    for ext in ("source", "ttir", "ttgir", "llir", "ptx", "cubin", "json"):
        (entry / f"{name}.{ext}").write_text(ext)
        children[f"{name}.{ext}"] = f"{old_root}/{KEY}/{name}.{ext}"
    (entry / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))
    return entry


def group(entry: Path, name: str = "_k") -> dict:
    return json.loads((entry / f"__grp__{name}.json").read_text())["child_paths"]


def test_install_points_the_groups_at_the_new_place(tmp_path):
    carried = tmp_path / "carried"
    fake_entry(carried)
    assert lease_cache.count(carried) == 0  # a copied cache: its groups name the old place
    info = lease_cache.install(carried, tmp_path / "cache")
    entry = (tmp_path / "cache" / KEY).resolve()
    children = group(entry)
    assert info["kernels"] == 1 and not info["rekeyed"]
    assert len(children) == 7 and all(Path(p) == entry / c and Path(p).is_file() for c, p in children.items())
    assert lease_cache.count(tmp_path / "cache") == 1


def test_pruning_keeps_what_the_runtime_reads(tmp_path):
    entry = fake_entry(tmp_path, old_root=tmp_path)
    lease_cache._relocate(entry, keep_ir=False)
    assert sorted(p.name for p in entry.iterdir()) == ["__grp___k.json", "_k.cubin", "_k.json"]
    assert sorted(group(entry)) == ["_k.cubin", "_k.json"]
    assert lease_cache.count(tmp_path) == 1


def test_rekey_only_when_libtriton_alone_differs():
    parts = ["3.6.0" + "a" * 64] + [c * 64 for c in "bcdef"]
    prepared = "-".join(parts)
    lib = "9" * 64
    other = parts[:3] + [lib] + parts[4:]
    assert lease_cache.rekey_reason(prepared, prepared, lib) is None
    assert lease_cache.rekey_reason(prepared, "-".join(other), lib) is None
    assert lease_cache.rekey_reason(prepared, "-".join(other[:2] + ["8" * 64] + other[3:]), lib)  # two parts
    assert lease_cache.rekey_reason(prepared, "-".join(parts[:3] + ["8" * 64] + parts[4:]), lib)  # not libtriton
    assert lease_cache.rekey_reason(prepared, "-".join(parts + [lib]), lib)  # another set of files


def test_key_dir_is_tritons():
    cache = pytest.importorskip("triton.runtime.cache")
    key = "some-key"
    assert lease_cache._key_dir(key) == cache._base32(hashlib.sha256(key.encode()).hexdigest())


def test_install_refuses_another_triton_release(tmp_path):
    pytest.importorskip("triton")
    carried = tmp_path / "carried"
    fake_entry(carried)
    (carried / lease_cache.MANIFEST).write_text(json.dumps(dict(triton_version="0.0.0", target="sm90", entries={})))
    try:
        with pytest.raises(ValueError, match="triton 0.0.0"):
            lease_cache.install(carried, tmp_path / "cache")
    except RuntimeError as e:  # no ptxas to ask its version
        pytest.skip(str(e))
    assert not (tmp_path / "cache").exists() or lease_cache.count(tmp_path / "cache") == 0


# Compiled for real: prepare one router launch for sm_90, move the directory (as carrying it
# does), install it elsewhere, compile again: a cache hit, read from the new place.
E2E = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    import triton
    from benchmarks import lease_cache
    from proper_kernels.compile_check import record, _specialise

    tmp = Path(sys.argv[1])
    launch = record("router-E8-k2", "bfloat16", "sm90")[0]
    lease_cache.prepare(tmp / "here", [("goal", "router-E8-k2", "bfloat16", 0)])
    shutil.move(tmp / "here", tmp / "carried")
    info = lease_cache.install(tmp / "carried", tmp / "gpu")
    before = lease_cache.count(tmp / "gpu")
    hits = []
    triton.knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
    with triton.knobs.cache.scope():
        triton.knobs.cache.dir = str(tmp / "gpu")
        src, options, gpu = _specialise(launch, "sm90")
        kernel = triton.compile(src, target=gpu, options=options.__dict__)
    print(json.dumps(dict(hits=hits, before=before, after=lease_cache.count(tmp / "gpu"),
                          cubin=kernel.metadata_group[src.name + ".cubin"], kernels=info["kernels"])))
""")


def test_a_moved_and_installed_cache_is_a_hit(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("TRITON_CACHE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", E2E, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        if "ptxas" in r.stderr or "Cannot find" in r.stderr:
            pytest.skip("no ptxas here")
        raise AssertionError(r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["hits"] == [True] and out["before"] == out["after"] == out["kernels"] == 1
    assert Path(out["cubin"]).resolve().is_relative_to((tmp_path / "gpu").resolve())
