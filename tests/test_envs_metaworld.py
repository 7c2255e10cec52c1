"""Meta-World env, action mapping, experts, suites and initial-state pools (damvla.envs.metaworld)."""

from __future__ import annotations

import numpy as np
import pytest

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

import mujoco  # noqa: E402

from damvla.envs.base import GRIPPER_INDEX, InitialState  # noqa: E402
from damvla.envs.metaworld import (  # noqa: E402
    GRIP_TASKS,
    INSTRUCTIONS,
    MT10,
    MT50,
    MetaWorldActionMapping,
    MetaWorldEnv,
    MetaWorldExpert,
    ReleaseAtSuccess,
    action_mapping_from_dict,
    dataset_action_mapping,
    gripper_flip_stats,
    initial_state_seeds,
    resolve_suite,
)
from damvla.weighting import gripper_flips  # noqa: E402

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def pick_place_env():
    env = MetaWorldEnv("pick-place-v3", resolution=64)
    yield env
    env.close()


def run_expert(env: MetaWorldEnv, expert, state: InitialState) -> tuple[bool, np.ndarray, dict]:
    """Roll ``expert`` from ``state`` until success (or release done) / time limit; returns
    (success reached, gripper column (T,), last info)."""
    obs, info, grip, success = env.reset(state), None, [], False
    expert.reset()
    while True:
        a = expert.act(obs, info)
        grip.append(a[GRIPPER_INDEX])
        obs, _, done, info = env.step(a)
        success = success or info["success"]
        if expert.done or (success and not isinstance(expert, ReleaseAtSuccess)) or (done and not success):
            return success, np.asarray(grip), info


def test_reset_with_recorded_initial_state_reproduces_first_observation(pick_place_env):
    env = pick_place_env
    state = env.sample_initial_state(7)
    first = env.reset(state)
    env.reset(env.sample_initial_state(8))  # a different episode in between
    for _ in range(5):
        env.step(np.array([1, 0, 0, 0, 0, 0, 0], dtype=np.float32))
    again = env.reset(InitialState.from_json(state.to_json()))  # through JSON, as stored on disk
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["privileged"], again["privileged"])
    assert first["state"].dtype == np.float32 and first["state"].shape == (4,)
    # The seed alone reproduces the state too, in a fresh env instance.
    other = MetaWorldEnv("pick-place-v3", render=False)
    try:
        assert other.sample_initial_state(7) == state
        np.testing.assert_array_equal(other.reset(state)["privileged"], first["privileged"])
    finally:
        other.close()


def test_reset_rejects_a_state_of_another_task(pick_place_env):
    with pytest.raises(ValueError, match="does not belong"):
        pick_place_env.reset(InitialState("metaworld_v3", "reach-v3", 0, {"rand_vec": [0.0] * 6}))


@pytest.fixture(scope="module")
def workspace_env():
    env = MetaWorldEnv("pick-place-v3", camera="workspace", resolution=64)
    yield env
    env.close()


def test_image_is_upright_hand_higher_in_world_is_higher_in_image(pick_place_env, workspace_env):
    """Segment the gripper with MuJoCo and check that raising the hand moves it up in the image."""
    obs = pick_place_env.reset(pick_place_env.sample_initial_state(0))
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal(obs["image"], pick_place_env.upright(pick_place_env.render_raw()))
    np.testing.assert_array_equal(obs["image"], pick_place_env.render_raw()[::-1, ::-1])  # corner cameras: 180 deg
    for env in (pick_place_env, workspace_env):
        _check_hand_moves_up_in_image(env)


def _segment(env: MetaWorldEnv, bodies: set[int]) -> np.ndarray:
    """Mask of the pixels showing geoms of ``bodies`` (or their descendants) from the env's camera."""
    model = env.sim.model
    geoms = [g for g in range(model.ngeom) if any(_descends_from(model, model.geom_bodyid[g], b) for b in bodies)]
    seg = mujoco.Renderer(model, env.height, env.width)
    seg.enable_segmentation_rendering()
    try:
        seg.update_scene(env.sim.data, camera=env.render_camera)
        ids = env.upright(seg.render())
    finally:
        seg.close()
    return (ids[..., 1] == mujoco.mjtObj.mjOBJ_GEOM) & np.isin(ids[..., 0], geoms)


def test_workspace_camera_shows_the_object_larger_than_corner4(pick_place_env, workspace_env):
    """The free "workspace" view exists for scale: the same object covers more pixels than in corner4."""
    state = pick_place_env.sample_initial_state(3)
    pixels = {}
    for env in (pick_place_env, workspace_env):
        env.reset(state)
        pixels[env.camera] = int(_segment(env, {env.sim.model.body("obj").id}).sum())
    assert pixels["corner4"] > 0 and pixels["workspace"] >= 1.5 * pixels["corner4"], pixels
    with pytest.raises(ValueError, match="workspace"):  # the error lists the free cameras too
        MetaWorldEnv("pick-place-v3", camera="no-such-camera", resolution=32)


def test_front_camera_is_mirror_symmetric_and_larger_than_corner4(pick_place_env):
    """The free "front" view faces the robot across the table: objects at -x and +x look alike (corner4 puts
    -x objects under the hand's fingers), both larger than in corner4, and the hand still moves up."""
    front = MetaWorldEnv("pick-place-v3", camera="front", resolution=64)
    try:
        _check_hand_moves_up_in_image(front)
        obj = front.sim.model.body("obj").id
        pixels, columns = {}, {}
        for env in (pick_place_env, front):
            for x in (-0.1, 0.1):
                env.reset(InitialState("metaworld_v3", "pick-place-v3", 0, {"rand_vec": [x, 0.65, 0.02, 0.0, 0.85, 0.15]}))
                mask = _segment(env, {obj})
                pixels[env.camera, x] = int(mask.sum())
                columns[env.camera, x] = np.nonzero(mask)[1].mean()
        assert min(pixels["front", -0.1], pixels["front", 0.1]) >= 2 * max(pixels["corner4", -0.1], pixels["corner4", 0.1]), pixels
        assert abs(pixels["front", -0.1] - pixels["front", 0.1]) <= 0.15 * pixels["front", 0.1], pixels
        # Mirror images about the centre column (the hand starts at x = 0, in the middle of the view).
        centre = (front.width - 1) / 2
        assert abs((columns["front", -0.1] - centre) + (columns["front", 0.1] - centre)) < 2, columns
        assert abs(columns["front", -0.1] - columns["front", 0.1]) > front.width / 4, columns
    finally:
        front.close()


def _check_hand_moves_up_in_image(env: MetaWorldEnv) -> None:
    model = env.sim.model
    rows = {}
    for name, dz in (("low", -1.0), ("high", 1.0)):
        env.reset(env.sample_initial_state(0))
        for _ in range(15):
            env.step(np.array([0, 0, dz, 0, 0, 0, 1], dtype=np.float32))
        mask = _segment(env, {model.body("hand").id})
        assert mask.any(), f"gripper not visible from {env.camera} ({name})"
        rows[name] = np.nonzero(mask)[0].mean()
    assert rows["high"] < rows["low"] - 2, (env.camera, rows)  # row 0 is the top of an upright image


def _descends_from(model, body: int, ancestor: int) -> bool:
    while body != 0:
        if body == ancestor:
            return True
        body = model.body_parentid[body]
    return False


def test_action_mapping_round_trip_7d_to_4d_and_back():
    rng = np.random.default_rng(0)
    m = MetaWorldActionMapping.for_task("assembly-v3")
    a7 = np.zeros((64, 7), dtype=np.float32)
    a7[:, :3] = rng.uniform(-1, 1, (64, 3))
    a7[:, GRIPPER_INDEX] = rng.integers(0, 2, 64)
    native = m.to_native(a7)
    assert native.shape == (64, 4)
    np.testing.assert_allclose(native[:, :3], a7[:, :3])
    # 1 = open -> effort -1; 0 = closed -> the expert's own closing effort (+ closes in Meta-World)
    np.testing.assert_allclose(native[:, 3], np.where(a7[:, GRIPPER_INDEX] > 0.5, -1.0, 0.6))
    np.testing.assert_allclose(m.from_native(native), a7)
    np.testing.assert_allclose(m.to_native(m.from_native(native)), native)
    # Rotations are dropped; out-of-range xyz is clipped like Meta-World does.
    out = m.from_native(m.to_native(np.array([2.0, -3.0, 0.5, 0.3, 0.2, 0.1, 1.0])))
    np.testing.assert_allclose(out, [1.0, -1.0, 0.5, 0, 0, 0, 1.0])
    # The dataset-level dict gives every task its own closing effort back.
    d = dataset_action_mapping(["pick-place-v3", "pick-out-of-hole-v3"])
    assert d["type"] == "metaworld_v3" and d["gripper_index"] == 6 and d["gripper_open"] == 1.0
    assert action_mapping_from_dict(d, "pick-out-of-hole-v3").closed_effort == pytest.approx(0.1)
    assert action_mapping_from_dict(d, "pick-place-v3").closed_effort == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no closing effort"):
        action_mapping_from_dict(d, "reach-v3")


def test_expert_solves_pick_place():
    env = MetaWorldEnv("pick-place-v3", render=False)
    try:
        for seed in initial_state_seeds("train", 2):
            success, grip, _ = run_expert(
                env, MetaWorldExpert("pick-place-v3"), env.sample_initial_state(seed)
            )
            assert success, f"seed {seed}"
            assert set(np.unique(grip)) <= {0.0, 1.0}
    finally:
        env.close()


def test_release_variant_produces_two_gripper_flips():
    env = MetaWorldEnv("pick-place-v3", render=False)
    try:
        expert = ReleaseAtSuccess(MetaWorldExpert("pick-place-v3"))
        success, grip, _ = run_expert(env, expert, env.sample_initial_state(3))
    finally:
        env.close()
    assert success and expert.done
    flips = gripper_flips(grip)
    assert len(flips) == 2, flips  # close on the puck, open at the goal
    assert grip[0] == 1.0 and grip[flips[0]] == 0.0 and grip[-1] == 1.0
    assert np.all(grip[-expert.hold_steps :] == 1.0)


def test_instructions_exist_for_all_50_tasks():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    assert set(INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS) and len(MT50) == 50
    assert all(isinstance(s, str) and len(s.split()) >= 3 for s in INSTRUCTIONS.values())
    assert len(set(INSTRUCTIONS.values())) == 50  # no two tasks share an instruction
    assert set(MT10) <= set(MT50) and set(GRIP_TASKS) <= set(MT50)


def test_train_and_eval_initial_state_pools_are_disjoint():
    train, evals = initial_state_seeds("train", 20), initial_state_seeds("eval", 20)
    assert not set(train) & set(evals)
    with pytest.raises(ValueError, match="eval pool"):
        initial_state_seeds("train", 10, offset=999_995)
    env = MetaWorldEnv("pick-place-v3", render=False)
    try:
        tr = {tuple(env.sample_initial_state(s).data["rand_vec"]) for s in train}
        ev = {tuple(env.sample_initial_state(s).data["rand_vec"]) for s in evals}
    finally:
        env.close()
    assert len(tr) == 20 and len(ev) == 20 and not tr & ev


def test_resolve_suite():
    assert (
        resolve_suite("mt10") == MT10
        and resolve_suite("MT50") == MT50
        and resolve_suite("grip") == GRIP_TASKS
    )
    assert resolve_suite("pick-place-v3, reach,pick-place-v3") == ["pick-place-v3", "reach-v3"]
    with pytest.raises(ValueError, match="unknown Meta-World task 'pick-plaice'"):
        resolve_suite("pick-plaice")


@pytest.mark.parametrize(
    ("task", "grips"),
    [("pick-place-v3", True), ("push-v3", True), ("reach-v3", False), ("drawer-open-v3", False)],
)
def test_grip_suite_membership_matches_expert_gripper_use(task, grips):
    stats = gripper_flip_stats(task, [0, 1])
    assert all(stats["success"]), stats
    assert (min(stats["flips"]) > 0) == grips, stats
    assert (task in GRIP_TASKS) == grips


def test_every_meta_world_instruction_fits_the_byte_presets_prompt_limit() -> None:
    """`collect --suite mt10` then `train --preset tiny|small` (the README's path) must not stop mid-run on
    a long task: CogACT's template around each MT50 instruction fits max_prompt_tokens."""
    from damvla.config import preset
    from damvla.model.language import prompt_token_ids
    from damvla.model.tokenizer import ByteTokenizer

    for name in ("tiny", "small", "cpu"):
        lang = preset(name).language
        longest = max(len(prompt_token_ids(lang, ByteTokenizer(), s)) for s in INSTRUCTIONS.values())
        assert longest <= lang.max_prompt_tokens, (name, longest)
