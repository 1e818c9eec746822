"""The trajectory store (one owner of the recorded format) and the durable-file toolkit: disk and
memory kinds agree, truncation, record kinds, the layout of earlier versions, crash artefacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tangentscope._durable import (
    DamagedFileError,
    append_csv_row,
    append_jsonl,
    atomic_write_json,
    read_csv,
    read_json,
    read_jsonl,
)
from tangentscope.dynamics import KernelTrajectory
from tangentscope.dynamics.store import DiskStore, MemoryStore, TrajectoryStore
from tangentscope.errors import ConfigError, TangentscopeError


def _snap(k, n=3, p=2, m=2):
    g = np.random.default_rng(k)
    return {"K_SS": g.standard_normal((n * p, n * p)), "K_QS": g.standard_normal((m * p, n * p)),
            "B": np.tile(np.eye(p), (n, 1, 1)) / n, "u": g.standard_normal((n, p)),
            "g": g.standard_normal((n, p)), "U_Q": g.standard_normal((m, p)),
            "dts": np.full(0 if k == 0 else 2, 0.1)}


def _fill(store, steps=(0, 2, 4, 6)):
    for k, s in enumerate(steps):
        store.append({"index": k, "step": s, "time": 0.1 * s, "lr": 0.1, "loss": 1.0 / (k + 1),
                      "test_loss": None, "test_gram_norm": None}, _snap(k))
    return store


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_disk_and_memory_stores_hold_the_same_trajectory(tmp_path, kind):
    meta = {"n": 3, "p": 2, "m": 2, "loss": "squared"}
    data = {"x": np.arange(6.0).reshape(3, 2)}
    store = TrajectoryStore.create(tmp_path / "t" if kind == "disk" else None, meta, data)
    assert isinstance(store, DiskStore if kind == "disk" else MemoryStore)
    _fill(store)
    traj = KernelTrajectory.from_store(store)
    assert traj.steps.tolist() == [0, 2, 4, 6] and traj.meta["n"] == 3
    np.testing.assert_allclose(traj.kernel(2).numpy(), _snap(2)["K_SS"])
    np.testing.assert_allclose(traj.u[1].numpy(), _snap(1)["u"])
    torch.testing.assert_close(traj.data["x"], torch.as_tensor(data["x"]))
    store.truncate_after(2)
    assert [r["step"] for r in store.records()] == [0, 2]
    store.append({"index": 2, "step": 3, "time": 0.3}, _snap(3))
    assert [r["step"] for r in store.records()] == [0, 2, 3]
    assert [r["seq"] for r in store.records()] == [0, 1, 2]
    if kind == "disk":
        again = TrajectoryStore.open(tmp_path / "t")
        assert [r["step"] for r in again.records()] == [0, 2, 3]
        assert again.arrays(again.records()[2], ["u"])["u"].shape == (3, 2)
        with pytest.raises(ConfigError, match="already holds"):
            TrajectoryStore.create(tmp_path / "t", meta, data)


def test_a_second_record_kind_lives_in_the_same_store(tmp_path):
    # what the matrix-free trajectory adds: parameter checkpoints beside (or instead of) kernels
    store = _fill(TrajectoryStore.create(tmp_path, {"n": 3, "p": 2, "m": 2}, {}), steps=(0, 2))
    store.append({"step": 2, "time": 0.2}, {"params/w": np.ones(5), "D": np.ones(5)},
                 kind="checkpoint")
    store.append({"step": 4, "time": 0.4}, {"params/w": np.zeros(5)}, kind="checkpoint")
    reopened = TrajectoryStore.open(tmp_path)
    assert [r["step"] for r in reopened.records("kernel")] == [0, 2]
    ck = reopened.records("checkpoint")
    assert [r["step"] for r in ck] == [2, 4] and len(reopened.records(None)) == 4
    assert set(reopened.arrays(ck[0])) == {"params/w", "D"}
    assert KernelTrajectory.load(tmp_path).steps.tolist() == [0, 2]
    reopened.truncate_after(2)                      # truncation applies to every kind
    assert [r["step"] for r in TrajectoryStore.open(tmp_path).records("checkpoint")] == [2]


def test_the_layout_of_earlier_versions_still_loads(tmp_path):
    # written as the recorder of the first release did: no "format", "kind" or "seq", and a
    # line cut by a crash left in the middle (that writer started a fresh line after it)
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "trajectory.json").write_text(json.dumps({"n": 3, "p": 2, "m": 2,
                                                          "loss": "squared"}))
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 1)))
    lines = []
    for k, s in enumerate((0, 2, 4)):
        np.savez(tmp_path / f"snapshots/{k:06d}.npz", **_snap(k))
        lines.append(json.dumps({"index": k, "step": s, "time": 0.1 * s, "lr": 0.1, "loss": 1.0,
                                 "file": f"snapshots/{k:06d}.npz", "bytes": 1}))
    lines.insert(2, '{"index": 2, "step": 4, "ti')
    lines.append(json.dumps({"truncate_after_step": 2}))
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    traj = KernelTrajectory.load(tmp_path)
    assert traj.steps.tolist() == [0, 2]
    np.testing.assert_allclose(traj.cross_kernel(1).numpy(), _snap(1)["K_QS"])


def test_a_record_lost_from_the_middle_is_reported_not_skipped(tmp_path):
    _fill(TrajectoryStore.create(tmp_path, {"n": 3, "p": 2, "m": 2}, {}))
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    (tmp_path / "index.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(DamagedFileError, match="missing or garbled"):
        KernelTrajectory.load(tmp_path)
    # a legacy index (no seq) with a lost record: the step increments give it away
    legacy = [json.dumps({k: v for k, v in json.loads(x).items() if k not in ("seq", "crc")})
              for x in lines[:1] + lines[2:]]
    (tmp_path / "index.jsonl").write_text("\n".join(legacy) + "\n")
    with pytest.raises(DamagedFileError, match="step increments"):
        KernelTrajectory.load(tmp_path)
    (tmp_path / "snapshots" / "000000.npz").unlink()
    with pytest.raises(DamagedFileError, match="000000.npz"):
        KernelTrajectory.load(tmp_path)


def test_jsonl_append_repairs_a_cut_last_line(tmp_path):
    f = tmp_path / "a.jsonl"
    append_jsonl(f, {"a": 1})
    with f.open("a") as fh:
        fh.write('{"a": 2, "b')                     # cut mid-record: dropped
    append_jsonl(f, {"a": 3})
    with f.open("a") as fh:
        fh.write('{"a": 4}')                        # cut just before its newline: kept
    append_jsonl(f, {"a": 5})
    recs, bad = read_jsonl(f)
    assert [r["a"] for r in recs] == [1, 3, 4, 5] and bad == 0


def test_csv_append_never_glues_a_row_onto_a_cut_one(tmp_path):
    f = tmp_path / "m.csv"
    append_csv_row(f, ["a", "b"], {"a": 1, "b": 2}, header=True)
    with f.open("a") as fh:
        fh.write("3,")
    append_csv_row(f, ["a", "b"], {"a": 5, "b": 6})
    assert read_csv(f, fix="-") == (["a", "b"], [["1", "2"], ["5", "6"]])


def test_readers_name_the_damaged_file_and_the_fix(tmp_path):
    f = tmp_path / "x.json"
    atomic_write_json(f, {"a": [1, 2]})
    assert read_json(f, fix="restore it") == {"a": [1, 2]}
    f.write_text('{"a": [1,')
    with pytest.raises(DamagedFileError, match=r"x\.json is damaged .*: restore it") as e:
        read_json(f, fix="restore it")
    assert isinstance(e.value, TangentscopeError) and e.value.path == f
    assert not list(tmp_path.glob("*.tmp"))


def test_a_memory_store_forgets_the_records_before_a_step():
    # what an in-memory checkpoint recording with keep_last does
    store = _fill(TrajectoryStore.create(None, {"n": 3, "p": 2, "m": 2}, {}), steps=(0, 2, 3))
    old = store.records()[0]
    assert store.array(old, "u") is not None
    store.discard_before(2)
    assert [r["step"] for r in store.records()] == [2, 3]
    assert store.arrays(store.records()[0], ["u"])["u"].shape == (3, 2)
    with pytest.raises(KeyError):
        store.arrays(old)
