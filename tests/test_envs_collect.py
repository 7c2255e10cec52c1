"""`damvla collect metaworld`: dataset contents, resume after an interruption, worker-count independence."""

from __future__ import annotations

import json

import numpy as np
import pytest

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

from damvla.cli import main  # noqa: E402
from damvla.data.lerobot import LeRobotDatasetReader  # noqa: E402
from damvla.envs import collect  # noqa: E402
from damvla.envs.base import InitialState  # noqa: E402
from damvla.envs.metaworld import INSTRUCTIONS, MetaWorldEnv  # noqa: E402
from damvla.keys import MAIN_IMAGE_KEY  # noqa: E402
from damvla.weighting import gripper_flips  # noqa: E402

pytestmark = pytest.mark.sim

ARGS = [
    "collect",
    "metaworld",
    "--suite",
    "pick-place-v3",
    "--episodes",
    "2",
    "--resolution",
    "32",
    "--no-progress",
]


def test_collect_cli_writes_a_lerobot_dataset_with_initial_states(tmp_path):
    out = tmp_path / "ds"
    assert main([*ARGS, "--workers", "1", "--release", "--out", str(out)]) == 0
    ds = LeRobotDatasetReader(out)
    assert ds.num_episodes == 2 and ds.fps == 80
    dam = ds.info["damvla"]
    assert dam["gripper_index"] == 6 and dam["gripper_open"] == 1.0
    assert dam["action_mapping"]["type"] == "metaworld_v3"
    recipe = dam["recipe"]
    assert recipe["release"] is True and recipe["camera"] == "corner4" and recipe["resolution"] == 32
    assert recipe["seeds"] == {"pick-place-v3": [0, 1]}
    for i in range(2):
        assert ds.episode_task(i) == INSTRUCTIONS["pick-place-v3"]
        actions = ds.episode_actions(i)
        assert actions.shape[1] == 7 and set(np.unique(actions[:, 6])) == {0.0, 1.0}
        assert np.all(actions[:, 3:6] == 0)
        assert len(gripper_flips(actions[:, 6])) == 2  # --release: close, then open at the goal
        frames = ds.episode_frames(i, "observation.images.image")
        assert frames.dtype == np.uint8 and frames.shape == (len(actions), 32, 32, 3)
        assert ds.episode_states(i).shape == (len(actions), 4)

    # Every attempt is logged with its initial state, which reproduces the stored episode's start.
    records = collect.load_episode_records(out)
    kept = [r for r in records if r["kept"]]
    assert [r["key"] for r in kept] == ["pick-place-v3/seed-0", "pick-place-v3/seed-1"]
    env = MetaWorldEnv("pick-place-v3", resolution=32)
    try:
        obs = env.reset(InitialState.from_dict(kept[1]["initial_state"]))
    finally:
        env.close()
    np.testing.assert_allclose(obs["state"], ds.episode_states(kept[1]["episode_index"])[0], atol=1e-6)

    # The same command again is a no-op; different settings on a finished dataset are an error.
    assert main([*ARGS, "--workers", "1", "--release", "--out", str(out)]) == 0
    assert main([*ARGS, "--workers", "1", "--out", str(out)]) == 1


def test_collect_resumes_after_interruption_without_duplicates(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real = collect.run_episode
    calls = {"n": 0}

    def dies_on_second_episode(job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-collection
        return real(job)

    monkeypatch.setattr(collect, "run_episode", dies_on_second_episode)
    with pytest.raises(KeyboardInterrupt):
        main([*ARGS, "--workers", "1", "--out", str(out)])
    assert not out.exists() and (tmp_path / "ds.partial").exists()

    monkeypatch.setattr(collect, "run_episode", real)
    assert main([*ARGS, "--workers", "1", "--out", str(out)]) == 0
    ds = LeRobotDatasetReader(out)
    assert ds.num_episodes == 2
    records = collect.load_episode_records(out)
    assert [r["seed"] for r in records] == [0, 1]  # seed 0 was not redone, seed 1 was added once
    assert not (tmp_path / "ds.partial").exists()


def test_collect_output_does_not_depend_on_worker_count(tmp_path):
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert main([*ARGS, "--workers", "1", "--out", str(one)]) == 0
    assert main([*ARGS, "--workers", "2", "--out", str(two)]) == 0
    a, b = LeRobotDatasetReader(one), LeRobotDatasetReader(two)
    assert a.num_episodes == b.num_episodes == 2
    for i in range(2):
        np.testing.assert_array_equal(a.episode_actions(i), b.episode_actions(i))
    ra = json.loads((one / "meta" / "info.json").read_text())["damvla"]["recipe"]
    rb = json.loads((two / "meta" / "info.json").read_text())["damvla"]["recipe"]
    assert ra["seeds"] == rb["seeds"]


def test_recollecting_with_other_settings_names_each_differing_setting_and_both_values(tmp_path):
    out = tmp_path / "ds"
    (out / "meta").mkdir(parents=True)
    recipe = {"tasks": ["pick-place-v3"], "episodes_per_task": 2, "camera": "corner4", "resolution": 32,
              "release": True, "max_steps": None, "seed_offset": 0}  # fmt: skip
    (out / "meta" / "info.json").write_text(json.dumps({"damvla": {"recipe": recipe}}))
    with pytest.raises(ValueError) as e:
        collect.collect_metaworld(out, "pick-place-v3", 2, resolution=64, release=False, progress=False)
    msg = str(e.value)
    assert "--resolution: dataset 32, this command 64" in msg and "--release: dataset True, this command False" in msg
    assert "--camera" not in msg and "--episodes" not in msg  # only what differs


def test_dart_noise_perturbs_the_executed_commands_and_records_the_experts(monkeypatch):
    """--noise: the env executes expert + correlated drift on xyz; the dataset keeps the expert's commands."""
    executed = []
    real_step = MetaWorldEnv.step

    def spy(self, action7):
        executed.append(np.array(action7, dtype=np.float64))
        return real_step(self, action7)

    monkeypatch.setattr(MetaWorldEnv, "step", spy)
    job = collect.CollectJob("reach-v3", 3, "corner4", 32, 100, False, 0, noise=0.3)
    try:
        first = collect.run_episode(job)
        steps = len(executed)
        again = collect.run_episode(job)
        executed_clean = len(executed)
        clean = collect.run_episode(collect.CollectJob("reach-v3", 3, "corner4", 32, 100, False, 0))
    finally:
        collect._close_worker_env()
    assert first["success"] and again["success"] and clean["success"]
    recorded = first["frames"]["action"].astype(np.float64)
    run = np.stack(executed[:steps])
    np.testing.assert_array_equal(again["frames"]["action"], first["frames"]["action"])  # seeded: repeats
    np.testing.assert_array_equal(run[:, 3:], recorded[:, 3:])  # rotation and gripper untouched
    drift = run[:, :3] - recorded[:, :3]
    inside = np.abs(run[:, :3]) < 1.0  # where clipping to [-1, 1] did not cut the drift
    assert np.abs(drift[inside]).mean() > 0.05  # the executed commands were perturbed ...
    d = drift[:, 0][inside[:, 0]]
    assert np.corrcoef(d[:-1], d[1:])[0, 1] > 0.5  # ... by a drift correlated over steps, not white noise
    # Without noise the executed and recorded commands are one and the same.
    np.testing.assert_array_equal(np.stack(executed[executed_clean:]), clean["frames"]["action"].astype(np.float64))
    with pytest.raises(ValueError, match="--noise"):
        collect.collect_metaworld("/nonexistent", "reach", 1, noise=2.0)


def test_dagger_keeps_policy_driven_episodes_labelled_by_the_expert_after_the_base(tmp_path, monkeypatch):
    """--policy CKPT --from BASE: BASE's episodes first, then episodes the checkpoint drove (kept although an
    untrained policy fails), their actions the expert's commands at the states the policy visited."""
    from damvla.config import preset
    from damvla.envs.metaworld import MetaWorldExpert, dataset_action_mapping
    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    base = tmp_path / "base"
    collect.collect_metaworld(base, "reach", 2, resolution=32, workers=1, max_steps=80, progress=False)
    meta = {"camera_keys": ["observation.images.image"],
            "damvla": {"gripper_index": 6, "action_mapping": dataset_action_mapping(["reach-v3"]),
                       "recipe": {"camera": "corner4", "resolution": 32, "seeds": {"reach-v3": [0, 1]}}}}  # fmt: skip
    cfg = preset("tiny")
    ckpt = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), meta, load_pretrained=False).save_pretrained(
        tmp_path / "ckpt"
    )
    labels, executed = [], []
    real_act, real_step = MetaWorldExpert.act, MetaWorldEnv.step
    monkeypatch.setattr(MetaWorldExpert, "act", lambda self, *a: labels.append(real_act(self, *a)) or labels[-1])
    monkeypatch.setattr(MetaWorldEnv, "step", lambda self, a: executed.append(np.array(a, np.float32)) or real_step(self, a))
    out = tmp_path / "dagger"
    collect.collect_metaworld(out, "reach", 2, workers=1, max_steps=12, policy=ckpt, base=base, progress=False)

    ds, old = LeRobotDatasetReader(out), LeRobotDatasetReader(base)
    assert ds.num_episodes == 4 and ds.info["damvla"]["recipe"]["policy"] == str(ckpt.resolve())
    kept = [r for r in collect.load_episode_records(out) if r["kept"]]
    assert [r["key"] for r in kept] == [f"reach-v3/seed-{s}" for s in range(4)]  # new seeds after the base's
    for i in range(2):  # the base, copied
        np.testing.assert_array_equal(ds.episode_actions(i), old.episode_actions(i))
        a, b = ds.episode_frames(i, MAIN_IMAGE_KEY), old.episode_frames(i, MAIN_IMAGE_KEY)
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 3  # re-encoded video
    for i in (2, 3):
        assert not kept[i]["success"] and ds.episode(i).length == 12  # failed, kept whole
    recorded = np.concatenate([ds.episode_actions(i) for i in (2, 3)])
    np.testing.assert_array_equal(recorded, np.stack(labels).astype(np.float32))  # the expert's labels ...
    assert not np.allclose(recorded[:, :3], np.stack(executed)[:, :3])  # ... of states the policy drove to
    with pytest.raises(ValueError, match="--from"):
        collect.collect_metaworld(tmp_path / "x", "reach", 1, resolution=64, base=base, progress=False)


def test_environment_state_records_metaworlds_observation_per_frame(tmp_path):
    out = tmp_path / "ds"
    assert main([*ARGS, "--episodes", "1", "--workers", "1", "--environment-state", "--out", str(out)]) == 0
    ds = LeRobotDatasetReader(out)
    assert ds.info["damvla"]["recipe"]["environment_state"] is True
    key = collect.ENV_STATE_KEY
    assert ds.features[key]["shape"] == [39] and ds.features[key]["names"][-3:] == ["goal_x", "goal_y", "goal_z"]
    env_state = ds.episode_arrays(0, [key])[key]
    states = ds.episode_states(0)
    assert env_state.shape == (len(states), 39)
    np.testing.assert_allclose(env_state[:, :3], states[:, :3], atol=1e-6)  # the hand, as observation.state has it
    assert np.ptp(env_state[:, 36:39], axis=0).max() == 0  # the goal does not move
    assert np.ptp(env_state[:, 4:7], axis=0).max() > 0.01  # the puck is carried
    # Without the option, the dataset is as before (no column), and the two recipes differ.
    assert main([*ARGS, "--episodes", "1", "--workers", "1", "--out", str(tmp_path / "plain")]) == 0
    assert key not in LeRobotDatasetReader(tmp_path / "plain").features
