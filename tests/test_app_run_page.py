"""The page of a recorded run (``tangentscope app RUN_DIR``) without a browser: what it serves
against the library's own analyses, the server-side validation, the run directories it opens
and refuses."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import tangentscope as ts
from recorded_runs import experiment_like, record
from tangentscope import ConfigError
from tangentscope.app import load_run, make_run_server
from tangentscope.app import run_data as RD
from tangentscope.cli import main
from tangentscope.dynamics import identity_residuals, residual, split_channels, window_operators


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return experiment_like(tmp_path_factory.mktemp("run") / "exp")


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_run_server(run_dir).start()
    yield srv
    srv.shutdown()


def get(srv, path, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type"), e.read()


def api(srv, path):
    status, _, body = get(srv, path)
    return status, json.loads(body)


def test_overview_lists_the_trajectory_metrics_and_experiment(server):
    status, o = api(server, "/api/run")
    assert status == 200
    assert o["experiment"] == "my-exp" and o["preset"] == "smoke" and o["status"] == "complete"
    assert o["summary"] == {"final_loss": 0.05}
    (t,) = o["trajectories"]
    assert t["name"] == "trajectory" and t["analysed"] and t["snapshots"] == 5
    assert t["steps"] == [0, 5, 10, 15, 20] and (t["n"], t["p"], t["m"]) == (12, 1, 6)
    m = o["metrics"]
    assert m["x"] == "step" and m["group"] == "optimizer" and m["rows"] == 10
    assert m["gate_columns"] == ["gate/fraction/0"] and "loss" in m["columns"]


def test_snapshots_are_the_library_analyses(server, run_dir):
    traj = ts.KernelTrajectory.load(run_dir / "trajectory")
    ids = identity_residuals(traj, 0, discretization="exp")
    for k in (0, 2, 4):
        status, s = api(server, f"/api/run/snapshots/{k}?trajectory=trajectory")
        assert status == 200 and s["step"] == int(traj.steps[k])
        lam, V = torch.linalg.eigh(traj.kernel(k))
        lam, V = lam.flip(0), V.flip(1)
        assert s["kernel"]["eigenvalues"] == pytest.approx(lam.tolist(), rel=1e-5, abs=1e-9)
        r = residual(traj, k)
        assert sum(s["kernel"]["energies"]) == pytest.approx(float(r @ r), rel=1e-4)
        if k == 0:
            assert s["channel"] is None and s["identities"] is None
            continue
        W = window_operators(traj, 0, k, discretization="exp").W
        split = split_channels(W, vectors={"r": r})
        assert s["channel"]["rank"] == split.rank
        assert s["channel"]["residual_channel_fraction"] == pytest.approx(
            split.energies["r"].channel_fraction, rel=1e-5)
        assert s["channel"]["eigenvalues"] == pytest.approx(split.eigenvalues.tolist(),
                                                            rel=1e-5, abs=1e-12)
        i = ids.stops.tolist().index(k)
        assert s["identities"]["dissipation_error"] == pytest.approx(ids.dissipation_error[i],
                                                                     rel=1e-5)
        assert s["identities"]["displacement_error"] == pytest.approx(
            ids.displacement_error[i], rel=1e-5)


def test_metrics_series_per_group(server):
    status, d = api(server, "/api/run/metrics?column=gate/fraction/0")
    assert status == 200 and d["x"] == "step"
    assert [s["group"] for s in d["series"]] == ["gated"]
    assert d["series"][0]["x"] == [0, 5, 10, 15, 20]
    assert d["series"][0]["y"] == pytest.approx([1 - s / 40 for s in range(0, 21, 5)])
    status, d = api(server, "/api/run/metrics?column=loss")
    assert [s["group"] for s in d["series"]] == ["adamw", "gated"]


@pytest.mark.parametrize("path,field", [
    ("/api/run/snapshots/5?trajectory=trajectory", "snapshot"),
    ("/api/run/snapshots/-1?trajectory=trajectory", "snapshot"),
    ("/api/run/snapshots/1.5?trajectory=trajectory", "snapshot"),
    ("/api/run/snapshots/abc?trajectory=trajectory", "snapshot"),
    ("/api/run/snapshots/99999999999999999999?trajectory=trajectory", "snapshot"),
    ("/api/run/snapshots/%D9%A3?trajectory=trajectory", "snapshot"),      # Arabic-Indic 3
    ("/api/run/snapshots/1?trajectory=other", "trajectory"),
    ("/api/run/snapshots/1?trajectory=trajectory&k=2", "k"),
    ("/api/run/snapshots/1?trajectory=trajectory&trajectory=trajectory", "trajectory"),
    ("/api/run/metrics?column=nope", "column"),
    ("/api/run/metrics", "column"),
    ("/api/run?x=1", "x"),
])
def test_bad_parameters_are_400_with_the_allowed_values(server, path, field):
    status, ctype, body = get(server, path)
    assert status == 400 and ctype == "application/json", body
    err = json.loads(body)
    assert err["field"] == field and err["error"]
    if field == "snapshot":
        assert err["allowed"] == {"type": "int", "min": 0, "max": 4}
        assert "0 ≤ k ≤ 4" in err["error"]


def test_routes_methods_and_local_assets(server):
    assert get(server, "/api/run", "POST")[0] == 405
    assert get(server, "/api/run", "PUT")[0] == 405
    assert get(server, "/nowhere")[0] == 404
    assert get(server, "/api/run/else")[0] == 404
    assert get(server, "/static/app.js")[0] == 404          # only the run page's assets
    status, ctype, html = get(server, "/")
    assert status == 200 and ctype.startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', html.decode())
    assert refs and all(r.startswith(("/static/", "data:")) for r in refs), refs
    for r in refs:
        if r.startswith("/static/"):
            assert get(server, r)[0] == 200, r
    js = get(server, "/static/run.js")[2].decode() + get(server, "/static/plot.js")[2].decode()
    assert not re.search(r"https?://", js)


def test_a_bare_recording_and_a_metrics_only_run(tmp_path):
    bare = load_run(record(tmp_path / "rec", steps=6, snapshot_every=3))
    assert list(bare.trajectories) == ["."] and bare.metrics == []
    assert [s["step"] for s in bare.trajectories["."].snapshots] == [0, 3, 6]
    rd = ts.RunDir.create(tmp_path / "m", {"a": 1}, meta={"experiment": "x"})
    rd.log(step=1, loss=0.5)
    only = load_run(tmp_path / "m")
    assert only.trajectories == {} and only.columns == ["loss"]


def test_a_trajectory_over_the_size_limit_is_listed_not_analysed(tmp_path, monkeypatch):
    monkeypatch.setattr(RD, "MAX_DIM", 4)
    srv = make_run_server(record(tmp_path / "rec", steps=4, snapshot_every=2)).start()
    try:
        status, o = api(srv, "/api/run")
        assert not o["trajectories"][0]["analysed"] and "over the page's 4" in \
            o["trajectories"][0]["note"]
        status, err = api(srv, "/api/run/snapshots/0")
        assert status == 400 and err["field"] == "trajectory"
    finally:
        srv.shutdown()


def test_run_directories_that_hold_no_run_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no recorded trajectory"):
        load_run(tmp_path / "empty")
    assert main(["app", str(tmp_path / "empty"), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tangentscope: error:") and "record_dir" in err[0]
    with pytest.raises(ConfigError, match="port"):
        make_run_server(tmp_path, port=70000)


def test_energies_are_finite_json(server):
    _, s = api(server, "/api/run/snapshots/4?trajectory=trajectory")
    vals = s["kernel"]["energies"] + s["channel"]["energies"]
    assert all(v is None or np.isfinite(v) for v in vals)
