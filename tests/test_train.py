"""The shared loop: sharded step == single-device step, on-device sampling, resume, the
checkpoints' pace."""

import os

import jax
import numpy as np
import optax
import pytest

from conftest import norm_rel_err, run_with_devices, tiny_config
from fsad.errors import UserError
from fsad.mesh import make_mesh
from fsad.methods import build_method
from fsad.train import fit, init_state, make_train_step, put_train_data, sample_balanced


def _setup(devices, synthetic, tx=None, **overrides):
    config = tiny_config(**{"data.img_size": synthetic.images.shape[1], **overrides})
    method = build_method(config)
    mesh = make_mesh(devices)
    tx = tx or method.optimizer(config.steps_per_epoch)
    normal = synthetic.images[synthetic.labels == 0][:40]
    anomaly = synthetic.images[synthetic.labels == 1][:5]
    data = put_train_data(normal, anomaly, mesh)
    state = init_state(method, jax.random.key(0), data, tx, mesh)
    return method, mesh, tx, state, data


def compare_one_and_eight_devices(folder: str) -> dict:
    """Runs in a Python with 8 forced CPU devices (conftest.run_with_devices): one SGD
    step on 1 and on 8 devices, computed in float64 (parameters and statistics stay
    float32); returns the loss, the norm-wise relative errors of every parameter update
    and BatchNorm statistic and of the initial model's saliency maps (a batch split over
    the devices), and how the parameters are placed."""
    jax.config.update("jax_enable_x64", True)
    from fsad.data import read_folder
    from fsad.data.synthetic import write_synthetic_dataset
    syn = read_folder(write_synthetic_dataset(os.path.join(folder, "s48"), size=48, n_train=40,
                                              n_test_good=4, n_per_class=2), 48, "")
    from fsad.explain import method_saliency_fn, saliency_batches
    from fsad.train import variables_of
    overrides = {"model.n_scales": 1, "augment.rotate_degrees": 0.0, "model.dtype": "float64"}
    results, maps = [], []
    for devices in (jax.devices()[:1], jax.devices()):
        method, mesh, tx, state, data = _setup(devices, syn, optax.sgd(0.05), **overrides)
        # saliency maps of the initial model, 8 images split over the mesh's devices (every
        # other pixel: a quarter of the float64 work)
        maps.append(saliency_batches(method_saliency_fn(method, tiny_config(**overrides)),
                                     variables_of(state), syn.images[:8, ::2, ::2], 8, mesh))
        init = jax.device_get(state.params)
        step = make_train_step(method, tx, mesh, 16)
        state, metrics = step(state, data, jax.random.key(10))
        update = jax.tree.map(lambda new, old: np.asarray(new) - old, jax.device_get(state.params),
                              init)
        placed = len(jax.tree.leaves(state.params)[0].sharding.device_set)
        results.append((update, jax.device_get(state.batch_stats), float(metrics["loss"]),
                        placed))
    (u1, b1, l1, _), (u8, b8, l8, placed8) = results
    return {"devices": jax.device_count(), "loss": [l1, l8], "replicated_over": placed8,
            "update_errors": [norm_rel_err(a, b)
                              for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u8))],
            "stats_errors": [norm_rel_err(a, b)
                             for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b8))],
            "saliency_error": norm_rel_err(*maps)}


def test_eight_devices_match_one(tmp_path):
    """One step, plain SGD: the sharded forward/backward and global BatchNorm statistics
    match one device. (Adam's first step is lr * sign(g), which would turn reduction-order
    noise in near-zero gradients into lr-sized differences.) 48 px and one pyramid scale so
    that BatchNorm's last stage normalises over 64 values (a 2x2 map), not 16 single
    pixels (the half scale's 1x1 map) that magnify float noise; no rotation, whose
    nearest-pixel rounding can pick another pixel when the sharded program fuses its float
    arithmetic otherwise.

    Computed in float64 (model.dtype): in float32 a ReLU input within rounding of 0 can
    take the other branch on 8 devices, and the gradient of every layer below it then
    differs (measured on an AMD EPYC host with AVX2: 3e-3 to 8e-3 in the stem, layer1 and
    layer2's first block, 2e-5 elsewhere), which says nothing about the sharding. In
    float64 the updates and statistics came out bit for bit equal (after the rounding to
    float32 parameters), the saliency maps within 4e-8. Runs in a subprocess with 8 forced CPU
    devices."""
    r = run_with_devices(8, "test_train", "compare_one_and_eight_devices", str(tmp_path))
    assert r["devices"] == 8 and r["replicated_over"] == 8  # parameters on every device
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6)
    errs = r["update_errors"]
    print(f"update rel. err: max {max(errs):.2e}, median {np.median(errs):.2e}")
    # room for the float32 rounding of parameters and statistics, no more: an error of the
    # sharding (another batch, a device's share of the gradient lost, per-device
    # BatchNorm) would move whole layers
    assert max(errs) < 1e-5, max(errs)
    assert float(np.median(errs)) < 1e-6
    assert max(r["stats_errors"]) < 1e-5
    assert r["saliency_error"] < 1e-5, r["saliency_error"]  # per image: no cross-device sum


def test_batch_not_divisible_is_refused():
    from fsad.validate import check_config
    with pytest.raises(UserError, match="multiple of 8"):
        check_config(tiny_config(batch_size=12), n_devices=8)


def test_sample_balanced_draws_from_the_right_rows():
    mesh = make_mesh(jax.devices()[:1])
    normal = np.zeros((7, 4, 4, 3), np.uint8)
    anomaly = np.full((3, 4, 4, 3), 255, np.uint8)
    data = put_train_data(normal, anomaly, mesh)
    images, labels = jax.jit(lambda d, k: sample_balanced(d, k, 0, 48, 1 / 3))(
        data, jax.random.key(0))
    assert images.shape == (48, 4, 4, 3) and int(labels.sum()) == 16
    np.testing.assert_array_equal(np.asarray(images).max(axis=(1, 2, 3)), 255 * labels)


def test_one_and_ten_shots_are_one_padded_shape_and_the_same_draws():
    """Padded to the bucket (as a run's seeds are), 60 normals with 1 or with 10 seen
    anomalies are one array shape (one compiled step, though 70 rows would cross a
    multiple of 64 that 61 does not), and the batches drawn are those of the unpadded
    rows: no black padding image, the same rows."""
    from fsad.buckets import ROWS_BUCKET
    mesh = make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    normal = rng.integers(1, 200, (60, 4, 4, 3), dtype=np.uint8)
    anomaly = rng.integers(200, 256, (10, 4, 4, 3), dtype=np.uint8)
    draw = jax.jit(lambda d, k, step: sample_balanced(d, k, step, 16, 0.5)[0])
    shapes = set()
    for shots in (1, 10):
        plain = put_train_data(normal, anomaly[:shots], mesh)
        padded = put_train_data(normal, anomaly[:shots], mesh, bucket=ROWS_BUCKET)
        shapes.add(padded.images.shape)
        for step in range(3):  # 1-shot: the anomaly stream cycles
            batch = np.asarray(draw(padded, jax.random.key(1), step))
            assert batch.reshape(16, -1).max(axis=1).min() > 0  # no padding row
            np.testing.assert_array_equal(batch, draw(plain, jax.random.key(1), step))
    assert shapes == {(128, 4, 4, 3)}


def test_save_pace_saves_once_its_seconds_have_passed_and_after_the_last_epoch():
    from fsad.checkpoints import SavePace
    now = [0.0]
    pace = SavePace(60, clock=lambda: now[0])
    due = []
    for t, last in [(30, False), (61, False), (100, False), (125, False), (126, True)]:
        now[0] = t
        due.append(pace.due(last))
    assert due == [False, True, False, True, True]  # the clock restarts at each save
    every_epoch = SavePace(0, clock=lambda: 0.0)
    assert all(every_epoch.due(False) for _ in range(3))


def test_ctrl_c_during_a_save_leaves_it_to_orbax(tmp_path, monkeypatch):
    """A Ctrl-C that stops a save half-way saves nothing more (Orbax renames a checkpoint
    only once complete; a second save of the step would meet the first's leftovers),
    and one between saves saves the state once."""
    from fsad import checkpoints
    state = {"w": jax.numpy.arange(3.0)}
    saver = checkpoints.PacedCheckpoints(checkpoints.checkpoint_manager(str(tmp_path)), 0)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_checkpoint", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        saver.epoch_end(2, state, last=False)
    monkeypatch.undo()
    assert not saver.interrupted(2, state) and saver.mngr.all_steps() == []
    saver.saving = False  # the run resumed: Ctrl-C between its saves
    assert saver.interrupted(3, state) and not saver.interrupted(3, state)
    assert list(saver.mngr.all_steps()) == [3]


def test_fit_saves_checkpoints_at_its_pace(tmp_path, synthetic, capsys, monkeypatch):
    """checkpoint_seconds 0: a checkpoint after every epoch; a pace longer than the run:
    after the last epoch only (DevNet's 50 short epochs on a GPU spent about half of
    their time saving one after each), and on Ctrl-C. All runs end in the same state."""
    method, mesh, tx, state, data = _setup(jax.devices()[:1], synthetic, **{
        "model.n_scales": 1, "augment.rotate_degrees": 0.0})
    step = make_train_step(method, tx, mesh, 16)

    def train(work, seconds, step_fn=step, given=None):
        """3 epochs of 2 steps from `state` (a copy, unless `given`) in `work`."""
        given = jax.tree.map(jax.numpy.copy, state) if given is None else given
        return fit(method, given, tx, data, mesh, jax.random.key(1), 16, 3, 2, str(work),
                   keep_checkpoints=5, make_step=lambda s: (step_fn, 0.0),
                   checkpoint_seconds=seconds)

    saved, ends = {}, []
    for seconds in (0.0, 1e6):
        work = tmp_path / f"pace_{seconds:g}"
        end, info = train(work, seconds)
        assert info["steps"] == 6
        saved[seconds] = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
        ends.append(jax.device_get(end.params))
    assert saved == {0.0: [2, 4, 6], 1e6: [6]}
    jax.tree.map(np.testing.assert_array_equal, *ends)

    # Ctrl-C in the middle of an epoch (here as the 5th step is called): the state of
    # step 4 is saved, and the rerun goes on from it to the same end
    calls = []

    def step_until_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*args)

    # gradients that are not finite under a finite loss (step 3's here): the run stops
    # there, before the checkpoint of the epoch, which held NaN parameters before
    seen = []

    def step_with_inf_gradients(*args):
        seen.append(1)
        new_state, metrics = step(*args)
        if len(seen) == 3:
            metrics = {**metrics, "grad_norm": jax.numpy.float32(np.inf)}
        return new_state, metrics

    work = tmp_path / "inf_gradients"
    with pytest.raises(UserError, match="the gradients' norm became inf at step 3"):
        train(work, 0.0, step_with_inf_gradients)
    assert os.listdir(work / "checkpoints") == ["2"]

    work = tmp_path / "ctrl_c"
    with pytest.raises(KeyboardInterrupt):
        train(work, 1e6, step_until_ctrl_c)
    assert os.listdir(work / "checkpoints") == ["4"]
    # a second Ctrl-C while the first is being handled (here as the state is looked at,
    # before its save starts) waits for the save: it skipped it, and the run lost every
    # step since its last checkpoint (a walkthrough: 5 of 6 double presses)
    import signal
    import fsad.train
    is_whole = fsad.train.is_whole

    def pressed_again(state):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # (Python runs the handler here)
            pass
        return is_whole(state)

    calls.clear()
    work_twice = tmp_path / "ctrl_c_twice"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as fsad.main's
    try:
        fsad.train.is_whole = pressed_again
        with pytest.raises(KeyboardInterrupt):
            train(work_twice, 1e6, step_until_ctrl_c)
    finally:
        fsad.train.is_whole = is_whole
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(work_twice / "checkpoints") == ["4"]
    assert "fsad: Ctrl-C: saving the newest step first" in capsys.readouterr().err
    capsys.readouterr()
    # room for the whole bar: pytest-xdist's workers have COLUMNS=80, which tqdm 4.66
    # (.ci/lowest_versions.txt) takes as the width of a captured stream and cuts to
    monkeypatch.setenv("COLUMNS", "200")
    end, info = train(work, 1e6)
    assert info["resumed_from"] == 4 and info["steps"] == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(end.params), ends[0])
    # the bar says where it resumed, and shows the last finished step's loss and epoch
    bar = capsys.readouterr().err.strip().split("\r")[-1]
    assert "(resumed at step 4)" in bar and "6/6" in bar, bar
    assert "loss=" in bar and "epoch=3" in bar, bar

    # Ctrl-C where it mostly lands: while the loop waits for the previous step's loss
    # (here the 3rd step's, read after the 4th was dispatched). The newest state, step
    # 4's, is saved (before, none was: the loop had matched the state against the step
    # it waited for)
    class ReadInterrupted:
        """A loss whose first read is interrupted by Ctrl-C, as a wait for it would be."""

        def __init__(self, loss):
            self.loss, self.read = loss, False

        def __float__(self):
            if not self.read:
                self.read = True
                raise KeyboardInterrupt
            return float(self.loss)

    calls.clear()

    def step_with_an_interrupted_wait(*args):
        calls.append(1)
        new, metrics = step(*args)
        return new, ({**metrics, "loss": ReadInterrupted(metrics["loss"])} if len(calls) == 3
                     else metrics)

    work = tmp_path / "ctrl_c_waiting"
    with pytest.raises(KeyboardInterrupt):
        train(work, 1e6, step_with_an_interrupted_wait)
    assert len(calls) == 4 and os.listdir(work / "checkpoints") == ["4"]
    end, info = train(work, 1e6)
    assert info["resumed_from"] == 4 and info["steps"] == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(end.params), ends[0])

    # Ctrl-C just after a step took the state in (its arrays donated, the new state not
    # yet kept): still the KeyboardInterrupt, and no checkpoint of a state that is gone
    def step_then_ctrl_c(*args):
        step(*args)
        raise KeyboardInterrupt

    work = tmp_path / "ctrl_c_after_donation"
    given = jax.tree.map(jax.numpy.copy, state)
    with pytest.raises(KeyboardInterrupt):
        train(work, 1e6, step_then_ctrl_c, given)
    assert jax.tree.leaves(given)[0].is_deleted()  # donated (else this case is not met)
    assert os.listdir(work / "checkpoints") == []


def damage_checkpoint(step_folder) -> None:
    """Empties the data files of an Orbax checkpoint's arrays (a damaged disk): its
    metadata still lists it, its restore fails."""
    for folder, _, files in os.walk(step_folder):
        for name in files:
            if folder.replace(os.sep, "/").endswith("ocdbt.process_0/d"):  # the arrays' data
                open(os.path.join(folder, name), "wb").close()


def test_fit_loads_the_trunks_weights_only_for_a_start(tmp_path, synthetic):
    """fit's `trunk` is called where no checkpoint is restored, its variables written over
    the initial state's as init_state(..., pretrained) writes them; a seed that resumes,
    or starts from another run's checkpoint (AHL's base), loads none: a finished run
    could not be read back, nor an AHL run start from its base, once the weights file
    had gone (it was loaded before any seed looked at its checkpoints)."""
    from fsad.checkpoints import checkpoint_manager, save_checkpoint
    method, mesh, tx, state, data = _setup(jax.devices()[:1], synthetic, **{
        "model.n_scales": 1})
    host = jax.device_get(state)
    pretrained = {"params": {"backbone": jax.tree.map(lambda a: a + 1, host.params["backbone"])},
                  "batch_stats": {"backbone": jax.tree.map(lambda a: a + 2,
                                                           host.batch_stats["backbone"])}}
    calls = []

    def trunk():
        calls.append(1)
        return pretrained

    def no_step(_):
        pytest.fail("a step was compiled")

    def run(epochs, work=None, start_from=None, load=trunk):
        return fit(method, state, tx, data, mesh, jax.random.key(1), 16, epochs, 2, work,
                   make_step=no_step, start_from=start_from, trunk=load)

    started, info = run(0)  # nothing to restore: the weights go in
    assert calls == [1] and info["resumed_from"] == 0
    expected = init_state(method, jax.random.key(0), data, tx, mesh, pretrained)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started),
                 jax.device_get(expected))
    assert not np.array_equal(host.params["backbone"]["conv1"]["kernel"],
                              jax.device_get(started.params["backbone"]["conv1"]["kernel"]))
    mngr = checkpoint_manager(str(tmp_path / "own" / "checkpoints"))
    save_checkpoint(mngr, 2, started.replace(step=jax.numpy.int32(2)))
    mngr.close()

    def gone():
        pytest.fail("the weights were loaded for a seed that restores a checkpoint")

    for work, start_from in ((tmp_path / "own", None),  # resumed (here: at its end)
                             (tmp_path / "ahl", str(tmp_path / "own" / "checkpoints"))):
        ended, info = run(1, str(work), start_from, gone)
        assert info["resumed_from"] == 2 and info["steps"] == 0
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(ended.params),
                     jax.device_get(started.params))
    # the base run's newest checkpoint damaged: its copy cannot be read either, and the
    # error names the base run to mend (the advice was to move this run's folder away,
    # after which the same damaged step was copied in again)
    damage_checkpoint(tmp_path / "own" / "checkpoints" / "2")
    with pytest.raises(UserError, match=r"copied from the base run's .*own/checkpoints, whose "
                                        r"newest checkpoint is then unreadable too"):
        run(1, str(tmp_path / "on_a_damaged_base"), str(tmp_path / "own" / "checkpoints"), gone)


def test_adopt_checkpoint_takes_the_newest_step_once(tmp_path):
    """AHL's ahl.base_workdir: the base run's newest checkpoint is put into the AHL run's
    folder (hard links), restorable there, and only into a folder that holds none."""
    import jax.numpy as jnp
    from fsad.checkpoints import (adopt_checkpoint, checkpoint_manager, restore_latest,
                                  save_checkpoint)
    mngr = checkpoint_manager(str(tmp_path / "base"))
    for step in (5, 7):
        save_checkpoint(mngr, step, {"step": jnp.int32(step), "w": jnp.arange(4.0) * step})
    mngr.close()
    assert adopt_checkpoint(str(tmp_path / "base"), str(tmp_path / "ahl")) == 7
    assert os.listdir(tmp_path / "ahl") == ["7"]
    assert adopt_checkpoint(str(tmp_path / "base"), str(tmp_path / "ahl")) is None
    mngr = checkpoint_manager(str(tmp_path / "ahl"))
    got = restore_latest(mngr, {"step": jnp.int32(0), "w": jnp.zeros(4)})
    mngr.close()
    assert int(got["step"]) == 7 and np.array_equal(got["w"], np.arange(4.0) * 7)


def test_an_unreadable_newest_checkpoint_gives_the_one_before_in_one_line(tmp_path, caplog):
    """A damaged newest checkpoint (its data files cut short) restores the one before,
    with a warning of one short line: it held TensorStore's whole spec, 7,300 lines."""
    import jax.numpy as jnp
    from fsad.checkpoints import checkpoint_manager, restore_latest, save_checkpoint
    mngr = checkpoint_manager(str(tmp_path))
    for step in (5, 7):  # w large enough to be kept in data files, not inline
        save_checkpoint(mngr, step, {"step": jnp.int32(step), "w": jnp.arange(1e5) * step})
    mngr.close()
    damage_checkpoint(tmp_path / "7")
    mngr = checkpoint_manager(str(tmp_path))
    fresh = {"step": jnp.int32(0), "w": jnp.zeros(100_000)}
    with caplog.at_level("WARNING"):
        got = restore_latest(mngr, fresh)
    assert int(got["step"]) == 5 and sorted(mngr.all_steps()) == [5, 7]  # a reader's: kept
    (line,) = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert line.startswith("checkpoint 7 in ") and line.endswith("trying the one before")
    assert "\n" not in line and len(line) < 600, line
    # a run that trains on from step 5 (resume) sets 7 aside: Orbax saved no step at or
    # below 7, its newest, so the resumed run's next checkpoints (6, 7) were skipped
    # without a word (a review's finding)
    got = restore_latest(mngr, fresh, resume=True)
    assert int(got["step"]) == 5 and mngr.all_steps() == [5]
    (aside,) = [d for d in os.listdir(tmp_path) if d.startswith("unreadable-7-")]
    assert aside in caplog.text
    for step in (6, 7):
        save_checkpoint(mngr, step, {"step": jnp.int32(step), "w": jnp.arange(1e5) * step})
    assert sorted(mngr.all_steps()) == [5, 6, 7]
    assert int(restore_latest(mngr, fresh, resume=True)["step"]) == 7
    # none restorable (another structure, after a change of fsad): a reader gets its state
    # back, a run that would train from the start without a word is stopped
    other = {"step": jnp.int32(0), "v": jnp.zeros(3)}
    assert restore_latest(mngr, other) is other
    with pytest.raises(UserError, match=r"no checkpoint in .* can be restored \(steps 7, 6, "
                                         r"5; .*\); move that folder away"):
        restore_latest(mngr, other, resume=True)
    mngr.close()
    # the other reads of the failed restore, which end later, stay quiet: a closed loop's
    # wakeup (a PytestUnraisableExceptionWarning of a fresh clone's suite, "Exception
    # ignored in: None ... Event loop is closed") is dropped, any other report passes
    import asyncio
    import sys
    import types
    from fsad import checkpoints
    assert isinstance(sys.unraisablehook, checkpoints._DropFailedReadReports)
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        wakeup = err
    elsewhere, other = RuntimeError("Event loop is closed"), ValueError("other")
    passed = []
    hook = checkpoints._DropFailedReadReports(passed.append)
    for exc in (wakeup, elsewhere, other):  # (the second not raised in call_soon_threadsafe)
        hook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, err_msg=None,
                                   exc_traceback=exc.__traceback__, object=None))
    assert [u.exc_value for u in passed] == [elsewhere, other]

