"""Training: pure steps learn, pmap over 2 devices == 1 device, resume == uninterrupted, 2 processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrijax import checkpoint, data, training
from mrijax.config import PRESETS
from mrijax.trainer import Trainer, split_subjects

REPO = Path(__file__).resolve().parents[1]

# Runs STEPS pmapped steps of `shallow` on a fixed global batch of 4 and prints the losses and a parameter
# checksum; the device count comes from XLA_FLAGS, set before jax is imported. (Tests train `shallow`, the fewest
# layers: compilation is most of these tests' time.)
PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from mrijax import training
    state = training.create_train_state("shallow", lr=1e-3, seed=0)
    p_train, p_eval = training.parallel_steps()
    rs = training.replicate(state)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(3):
        batch = {"source": rng.uniform(0, 1, (4, 30, 30, 30, 1)).astype(np.float32),
                 "target": rng.uniform(0, 1, (4, 16, 16, 16, 1)).astype(np.float32)}
        rs, m = p_train(rs, training.shard_batch(batch))
        losses.append(float(np.asarray(m["loss"])[0]))
    kernel = np.asarray(rs.params["conv5_full"]["kernel"])
    mean = np.asarray(rs.batch_stats["bn4_dhw"]["mean"])
    print(json.dumps({"devices": jax.local_device_count(), "losses": losses,
                      "kernel": kernel[0].ravel().tolist(), "bn_mean": mean[0].tolist(),
                      "replicas_equal": bool(np.allclose(kernel[0], kernel[-1]))}))
""")


def _run_parallel(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PARALLEL_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_devices_follow_the_same_trajectory_as_one():
    one, two = _run_parallel(1), _run_parallel(2)
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["replicas_equal"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-3)  # summation order differs; Adam amplifies
    # Parameters: within a tenth of one Adam step (lr 1e-3). Adam divides by the gradient's RMS, so a weight whose
    # gradient is ~0 can turn float summation-order noise into a larger step: allow that for a few, never a full step.
    two_k, one_k = np.asarray(two["kernel"]), np.asarray(one["kernel"])
    close = np.abs(two_k - one_k) <= 1e-4 + 1e-3 * np.abs(one_k)
    assert close.mean() >= 0.99, f"{(~close).sum()} of {close.size} weights differ"
    assert np.abs(two_k - one_k).max() < 1e-3
    # BatchNorm statistics synchronised across devices = statistics of the global batch
    np.testing.assert_allclose(two["bn_mean"], one["bn_mean"], rtol=1e-3, atol=1e-6)


def test_unmapped_train_step_fits_a_fixed_batch():
    state = training.create_train_state("shallow", lr=3e-3, seed=0, bn_axis_name=None)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, 30, 30, 30, 1)).astype(np.float32)
    batch = {"source": x, "target": x[:, 7:23, 7:23, 7:23] * 0.5}
    step = jax.jit(training.train_step)
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 8


@pytest.fixture(scope="module")
def phantom_subjects(tmp_path_factory):
    root = data.make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_subjects=3, seed=5)
    return data.load_subjects(root)


def _smoke_trainer(subjects, workdir, epochs=3, log=lambda *a: None, val=1, **changes):
    # Augmentation on: shifts and mirrors must be pure functions of (seed, epoch) for an exact resume. (The
    # schedule stays constant: `epochs` stands in for the interruption here, and a cosine spans all epochs.)
    config = PRESETS["smoke"].replace(variant="shallow", epochs=epochs, max_steps_per_epoch=2, max_val_batches=1,
                                      jitter=4, flip=True).replace(**changes)
    train, val = split_subjects(subjects, val)
    return Trainer(config, train, val, workdir, progress=False, log=log)


def _assert_same_variables(a, b):
    """Bit for bit: a resumed run computes exactly what the uninterrupted one computes."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(phantom_subjects, tmp_path_factory):
    """The 3-epoch smoke run every resume is compared with."""
    return _smoke_trainer(phantom_subjects, tmp_path_factory.mktemp("full")).fit()


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(phantom_subjects, uninterrupted,
                                                                           tmp_path):
    full = uninterrupted
    _smoke_trainer(phantom_subjects, tmp_path / "cut", epochs=1).fit()  # "interrupted" after epoch 1
    resumed = _smoke_trainer(phantom_subjects, tmp_path / "cut").fit(resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    _assert_same_variables(full["variables"], resumed["variables"])
    assert [h["train_mse"] for h in resumed["history"]] == [h["train_mse"] for h in full["history"]]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]
    assert (tmp_path / "cut" / "loss.png").stat().st_size > 0
    variables, meta = checkpoint.load_model(tmp_path / "cut")  # the best export
    assert meta["variant"] == "shallow" and meta["val_subjects"] == [phantom_subjects[-1].id]
    assert np.isfinite(meta["val_mse"])
    # a second run into the same folder without --resume is refused rather than mixed
    with pytest.raises(ValueError, match="--resume"):
        _smoke_trainer(phantom_subjects, tmp_path / "cut").fit()


def test_a_signal_mid_epoch_saves_that_step_and_resume_finishes_the_same_run(phantom_subjects, uninterrupted,
                                                                              tmp_path, monkeypatch):
    """SIGINT after step 3 of 6 (inside epoch 2): the step in flight completes, step 3 is saved, the run raises
    KeyboardInterrupt; resuming skips the epoch's first batch and ends bit for bit where the full run ends."""
    # A shell's background job (as CI may start the suite) inherits SIGINT ignored, and the trainer respects an
    # ignored signal: give this test the interactive default, and put the inherited one back afterwards.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_mid_epoch_then_resume(phantom_subjects, uninterrupted, tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _interrupt_mid_epoch_then_resume(phantom_subjects, uninterrupted, tmp_path, monkeypatch):
    p_train, p_eval = training.parallel_steps()
    calls = []

    def interrupting(state, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler only sets its stop flag
        return p_train(state, batch)

    logs = []
    monkeypatch.setattr(training, "parallel_steps", lambda **_: (interrupting, p_eval))
    with pytest.raises(KeyboardInterrupt):
        _smoke_trainer(phantom_subjects, tmp_path, log=logs.append).fit()
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert len(calls) == 3 and any("interrupted: saved step 3" in line for line in logs)
    assert checkpoint.make_manager(tmp_path).latest_step() == 3
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]
    resumed = _smoke_trainer(phantom_subjects, tmp_path, log=logs.append).fit(resume=True)
    assert any("resumed from step 3" in line for line in logs)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    _assert_same_variables(uninterrupted["variables"], resumed["variables"])
    assert resumed["best_val_mse"] == uninterrupted["best_val_mse"]


def test_check_resume_names_what_changed_and_accepts_what_older_checkpoints_lack(phantom_subjects):
    from mrijax.trainer import check_resume, run_identity

    config = PRESETS["smoke"]
    train, val = split_subjects(phantom_subjects, 1)
    stored = {"epoch": 0, **run_identity(config, train, val)}
    check_resume(stored, run_identity(config.replace(epochs=9, compute_dtype="bfloat16", impl="xla"), train, val),
                 "run")  # may change on resume
    assert stored["data"] == str(Path(phantom_subjects[0].paths["source"]).resolve().parents[2])
    other_val = run_identity(config, *split_subjects(phantom_subjects, [phantom_subjects[0].id]))
    cases = [(run_identity(config.replace(lr=0.5), train, val), "another configuration \\(lr 0.001 -> 0.5\\)"),
             ({**stored, "data": "/elsewhere"}, "another data folder"),
             (run_identity(config, train[:1], val), "other training subjects"),
             (other_val, "other validation subjects")]
    for current, message in cases:
        with pytest.raises(ValueError, match=f"^run holds a run trained with .*{message}.*; use the same flags or a "
                                             "new --workdir$") as error:
            check_resume(stored, current, "run")
        assert "\n" not in str(error.value)
    # a checkpoint written before data and subjects were recorded: unknown, accepted
    check_resume({"epoch": 0, "config": stored["config"]}, other_val, "run")


def test_resume_may_change_precision_but_not_the_run(phantom_subjects, tmp_path):
    _smoke_trainer(phantom_subjects, tmp_path, epochs=1).fit()
    with pytest.raises(ValueError, match="another configuration"):
        _smoke_trainer(phantom_subjects, tmp_path, epochs=2, lr=0.5).fit(resume=True)
    with pytest.raises(ValueError, match="other validation subjects"):
        _smoke_trainer(phantom_subjects, tmp_path, epochs=2, val=[phantom_subjects[0].id]).fit(resume=True)
    moved = tmp_path.parent / f"{tmp_path.name}-moved-data"
    shutil.copytree(Path(phantom_subjects[0].paths["source"]).parents[2], moved)
    with pytest.raises(ValueError, match=f"{tmp_path} holds a run trained with another data folder"):
        _smoke_trainer(data.load_subjects(moved), tmp_path, epochs=2).fit(resume=True)
    logs = []
    trainer = _smoke_trainer(phantom_subjects, tmp_path, epochs=2, log=logs.append, compute_dtype="bfloat16")
    history = trainer.fit(resume=True)["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all(np.isfinite(h["val_mse"]) for h in history)
    assert any("resuming with bfloat16" in line for line in logs)


def test_init_from_starts_with_a_trained_models_weights(phantom_subjects, tmp_path):
    _smoke_trainer(phantom_subjects, tmp_path / "first", epochs=1).fit()
    warm = _smoke_trainer(phantom_subjects, tmp_path / "warm", epochs=1, init_from=str(tmp_path / "first"))
    state = warm.new_state()
    exported, _ = checkpoint.load_model(tmp_path / "first")
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(state.variables)):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(warm.fit()["history"][0]["val_mse"])
    # a cold start differs (the warm start really replaced the initial weights)
    cold = _smoke_trainer(phantom_subjects, tmp_path / "cold", epochs=1).new_state()
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(cold.params),
                                                        jax.tree_util.tree_leaves(state.params)))
    with pytest.raises(FileNotFoundError, match="no model at"):
        _smoke_trainer(phantom_subjects, tmp_path / "y", init_from=str(tmp_path / "missing")).new_state()
    with pytest.raises(ValueError, match="--variant shallow"):
        _smoke_trainer(phantom_subjects, tmp_path / "x", variant="base", init_from=str(tmp_path / "first")).new_state()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_over_loopback(phantom_subjects, tmp_path):
    root = Path(phantom_subjects[0].paths["source"]).parents[2]
    port = _free_port()
    common = [sys.executable, str(REPO / "experiments" / "train.py"), "--variant", "shallow", "--preset", "smoke",
              "--data", str(root), "--epochs", "1", "--batch-size", "2", "--workdir", str(tmp_path / "run"),
              "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    # no allocator restart (tested in test_cli): it would import JAX twice in each process
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MRIJAX_HUGEPAGES": "0"}
    procs = [subprocess.Popen(common + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert np.isfinite(summary["train_mse"]) and np.isfinite(summary["val_mse"])
    assert "2 devices" in outs[0][0]
    assert (tmp_path / "run" / "best" / "model.json").exists()


def test_block_mse_scores_whole_volume_predictions_over_the_validation_blocks(phantom_subjects):
    from mrijax.trainer import block_mse

    subjects = phantom_subjects[:2]
    records = data.patch_records(subjects, 16)
    perfect = {s.id: s.target for s in subjects}
    zeros = {s.id: np.zeros_like(s.target) for s in subjects}
    assert block_mse(perfect, subjects, records, (16, 16, 16)) == 0.0
    expected = np.mean([np.mean(data.extract_patch(subjects[i].target, c, (16, 16, 16)) ** 2)
                        for i, *c in records])
    np.testing.assert_allclose(block_mse(zeros, subjects, records, (16, 16, 16)), expected, rtol=1e-6)


def test_cosine_schedule_decays_the_step_size_to_zero():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.ones(3)}

    def step_sizes(tx, n):
        state, sizes = tx.init(params), []
        for _ in range(n):
            updates, state = tx.update(grads, state, params)
            sizes.append(float(jnp.abs(updates["w"][0])))
        return sizes

    constant = step_sizes(training.make_optimizer(1e-2), 10)
    cosine = step_sizes(training.make_optimizer(1e-2, decay_steps=10), 10)
    np.testing.assert_allclose(constant, 1e-2, rtol=1e-3)  # Adam on a constant gradient: steps of size lr
    np.testing.assert_allclose(cosine[0], 1e-2, rtol=1e-3)
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] < 0.03 * 1e-2


def test_augmented_trainer_reads_mirrored_subjects_and_new_blocks_each_epoch(phantom_subjects, tmp_path):
    config = PRESETS["smoke"].replace(variant="shallow", flip=True, jitter=4, schedule="cosine")
    train, val = split_subjects(phantom_subjects, 1)
    run = Trainer(config, train, val, tmp_path, progress=False, log=lambda *a: None)
    plain = Trainer(PRESETS["smoke"].replace(variant="shallow"), train, val, tmp_path / "plain", progress=False)
    assert [s.id for s in run.train_subjects] == [s.id for s in train]  # metadata names the real subjects
    mirrors = [data.mirrored(s) for s in train]
    assert [s.id for s in run.fit_subjects] == [s.id for s in train + mirrors]
    assert len(run.train_records) == len(plain.train_records) + len(data.patch_records(mirrors, config.step))
    result = run.fit()
    assert len(result["history"]) == config.epochs and all(np.isfinite(h["train_mse"]) for h in result["history"])
