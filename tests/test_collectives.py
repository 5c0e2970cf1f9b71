"""Worker processes (`--workers`): host collectives, failure handling, and a worker step against a reference."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mrijax import collectives, training
from mrijax.config import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _exchange(group, folder):
    """Three means of index-dependent values, then two `any`s (one flag set in worker 1, then none)."""
    rng = np.random.default_rng(group.index)
    values = [rng.normal(size=(7, 5)).astype(np.float32), np.arange(3.0) * (group.index + 1), np.array([1e-3])]
    means = [group.host_mean(v) for v in values]
    anyone = [group.any(group.index == 1), group.any(False)]
    np.savez(Path(folder) / f"{group.index}.npz", *means, anyone=np.array(anyone))


def test_host_means_are_the_same_bits_in_every_process(tmp_path):
    codes = collectives.spawn(3, _exchange, str(tmp_path))
    assert codes == [0, 0, 0]
    results = [np.load(tmp_path / f"{i}.npz") for i in range(3)]
    inputs = [[np.random.default_rng(i).normal(size=(7, 5)).astype(np.float32), np.arange(3.0) * (i + 1),
               np.array([1e-3])] for i in range(3)]
    for k in range(3):
        expected = np.mean([np.asarray(inp[k], np.float64) for inp in inputs], axis=0)
        np.testing.assert_allclose(results[0][f"arr_{k}"], expected, rtol=1e-15)
        for r in results[1:]:
            np.testing.assert_array_equal(r[f"arr_{k}"], results[0][f"arr_{k}"])
    assert all(r["anyone"].tolist() == [True, False] for r in results)


def _fail_or_wait(group, folder):
    if group.index == 1:
        raise ValueError("worker 1 fails before its first exchange")
    try:
        group.host_mean(np.ones(4))
    except collectives.WorkerFailed as e:
        Path(folder, "seen.txt").write_text(str(e))
        raise


def test_a_failing_worker_stops_the_others_instead_of_leaving_them_waiting(tmp_path):
    start = time.monotonic()
    codes = collectives.spawn(2, _fail_or_wait, str(tmp_path))
    assert time.monotonic() - start < 120
    assert codes == [1, 1]  # each exits with its own status: neither is terminated while it is still stopping
    assert "another worker failed" in (tmp_path / "seen.txt").read_text()


def _fail_or_hang(group):
    if group.index == 1:
        raise ValueError("worker 1 fails")
    time.sleep(600)  # never reaches an exchange, so it cannot see the failure


def test_a_worker_that_does_not_stop_after_another_failed_is_terminated_after_the_grace():
    start = time.monotonic()
    codes = collectives.spawn(2, _fail_or_hang, grace=1.0)
    assert time.monotonic() - start < 120
    assert codes == [-signal.SIGTERM, 1]


def _batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"source": rng.uniform(0, 1, (n, 30, 30, 30, 1)).astype(np.float32),
            "target": rng.uniform(0, 1, (n, 16, 16, 16, 1)).astype(np.float32)}


def _worker_steps(group, folder):
    """Two steps of the trainer's worker step (pmapped over this process's device) on this worker's half."""
    state = training.create_train_state("shallow", lr=1e-3, seed=0)
    p_train, _ = training.parallel_steps(group=group)
    rs = training.replicate(state)
    losses = []
    for step in range(2):
        batch = _batch(seed=step)
        half = {k: v[2 * group.index:2 * group.index + 2] for k, v in batch.items()}
        rs, m = p_train(rs, training.shard_batch(half))
        losses.append(float(np.asarray(m["loss"])[0]))
    leaves = [np.asarray(x)[0] for x in jax.tree_util.tree_leaves((rs.params, rs.batch_stats))]
    np.savez(Path(folder) / f"{group.index}.npz", *leaves, losses=np.array(losses))


def test_workers_step_as_replicas_that_average_gradients_and_keep_their_own_batchnorm(tmp_path):
    """Two workers = the pmap semantics of two replicas whose BatchNorm normalises each one's half (a vmapped
    step over a named axis, BatchNorm unsynchronised), with the running statistics averaged."""
    assert collectives.spawn(2, _worker_steps, str(tmp_path)) == [0, 0]
    worker = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    keys = [k for k in worker[0].files if k != "losses"]
    for k in [*keys, "losses"]:  # identical replicas
        np.testing.assert_array_equal(worker[0][k], worker[1][k])

    state = training.create_train_state("shallow", lr=1e-3, seed=0, bn_axis_name=None)
    step = jax.vmap(lambda s, b: training.train_step(s, b, axis_name="replicas"), in_axes=(0, 0),
                    axis_name="replicas")
    states = jax.tree_util.tree_map(lambda x: np.stack([x, x]), state)
    losses = []
    for s in range(2):
        states, m = step(states, {k: v.reshape(2, 2, *v.shape[1:]) for k, v in _batch(seed=s).items()})
        losses.append(float(m["loss"][0]))
    np.testing.assert_allclose(worker[0]["losses"], losses, rtol=1e-4)
    params = jax.tree_util.tree_leaves(states.params)
    stats = jax.tree_util.tree_leaves(states.batch_stats)
    reference = [p[0] for p in params] + [s.mean(axis=0) for s in stats]
    for k, ref in zip(keys, reference):
        # within a tenth of one Adam step (lr 1e-3); the two programs sum in different orders
        np.testing.assert_allclose(worker[0][k], ref, atol=1e-4, rtol=1e-3, err_msg=k)


def test_workers_are_a_train_command_flag(phantom_dataset, tmp_path):
    from mrijax import data
    from mrijax.cli import train
    from mrijax.trainer import Trainer

    subjects = data.load_subjects(phantom_dataset)
    with pytest.raises(ValueError, match="started by `mrijax train` and `mrijax cv`"):
        Trainer(PRESETS["smoke"].replace(workers=2), subjects[:-1], subjects[-1:], tmp_path)
    with pytest.raises(ValueError, match="drop --devices"):
        train.main(["--preset", "smoke", "--workers", "2", "--devices", "2", "--workdir", str(tmp_path)])


def _cli(script, root, *extra):
    cmd = [sys.executable, str(REPO / "experiments" / script), "--variant", "shallow", "--preset", "smoke",
           "--data", str(root), "--batch-size", "4", "--workers", "2", "--no-progress", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MRIJAX_HUGEPAGES": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_two_workers_train_resume_export_and_train_cv_folds_as_one_run(phantom_dataset, tmp_path):
    from mrijax import checkpoint, cv, data

    def same_bits(a, b):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)

    root = phantom_dataset
    full = _cli("train.py", root, "--workdir", str(tmp_path / "full"), "--epochs", "2")
    assert "2 worker processes" in full and full.count("epoch 2/2") == 1  # worker 0 alone logs
    _cli("train.py", root, "--workdir", str(tmp_path / "cut"), "--epochs", "1")
    one_epoch, _ = checkpoint.load_model(tmp_path / "cut")
    _cli("train.py", root, "--workdir", str(tmp_path / "cut"), "--epochs", "2", "--resume")
    a, meta_a = checkpoint.load_model(tmp_path / "full")
    b, meta_b = checkpoint.load_model(tmp_path / "cut")
    same_bits(a, b)
    assert meta_a["val_mse"] == meta_b["val_mse"] and meta_a["config"]["workers"] == 2
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]

    # `mrijax cv --workers 2`: the fold holding out the validation subject trains the run above on the same subject
    ids = [s["id"] for s in data.find_subjects(root, ["T1w", "T2w"])]
    out = _cli("cv.py", root, "--epochs", "1", "--groups", *ids, "--train-folds", "2", "--out", str(tmp_path / "cv"))
    assert out.count("fold 2-") == 1  # announced once, by worker 0
    fold = tmp_path / "cv" / cv.fold_name(1, ids[1:])
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == [fold.name]
    assert not (fold / cv.TRAINING_LOCK).exists()
    model, meta = checkpoint.load_model(fold / "model")
    assert meta["train_subjects"] == ids[:1] and meta["config"]["workers"] == 2
    same_bits(model, one_epoch)


def test_workers_refuse_a_cpu_whose_store_order_the_exchange_cannot_rely_on(monkeypatch):
    monkeypatch.setattr(collectives.platform, "machine", lambda: "aarch64")
    with pytest.raises(ValueError, match="x86-64 CPU, this is aarch64"):
        collectives.spawn(2, _exchange, "unused")
