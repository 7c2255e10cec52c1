"""SIMPLER adapter: CogACT's action conventions against independent references, the sticky-gripper state
machine, the inter-process protocol, the protocol grids, and `damvla eval --suite simpler:...` end to end
against a fake SIMPLER server (tests/fake_simpler_server.py) speaking the real protocol."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from damvla.envs import simpler
from damvla.envs.base import InitialState
from damvla.envs.simpler import (
    SimplerActionMapping,
    SimplerClient,
    SimplerEnv,
    SimplerServerError,
    StickyGripper,
    axis_angle_to_euler,
    euler_to_axis_angle,
    resolve_suite,
    widowx_gripper,
)
from damvla.envs.simpler_server import ProtocolError, read_message, serve, write_message
from damvla.envs.simpler_suites import NAMED_SUITES, euler_to_quat, robot_quat

Rotation = pytest.importorskip("scipy.spatial.transform").Rotation

FAKE_SERVER = Path(__file__).with_name("fake_simpler_server.py")


@pytest.fixture
def fake_simpler(monkeypatch):
    """Point damvla at the fake server, run with this interpreter."""
    monkeypatch.setenv(simpler.PYTHON_ENV_VAR, sys.executable)
    monkeypatch.setenv(simpler.SERVER_ENV_VAR, str(FAKE_SERVER))
    return FAKE_SERVER


# ---- rotations -----------------------------------------------------------------------------------
def test_euler_deltas_become_the_rotation_vector_scipy_computes():
    rng = np.random.default_rng(0)
    rpy = np.concatenate([rng.uniform(-0.3, 0.3, (200, 3)), rng.uniform(-1.5, 1.5, (200, 3))])
    for e in rpy:
        ours = euler_to_axis_angle(e)
        ref = Rotation.from_euler("xyz", e).as_rotvec()  # lower-case xyz: static (extrinsic) axes
        assert np.allclose(ours, ref, atol=1e-6), (e, ours, ref)


def test_large_rotations_keep_transforms3d_angle_but_the_same_rotation():
    # transforms3d's euler2axangle returns 2*acos(w) without flipping the quaternion's sign: for rotations
    # past pi it gives the long way round; the rotation itself must still be scipy's.
    rng = np.random.default_rng(1)
    for e in rng.uniform(-np.pi, np.pi, (300, 3)):
        v = euler_to_axis_angle(e)
        assert 0 <= np.linalg.norm(v) <= 2 * np.pi + 1e-9
        assert np.allclose(
            Rotation.from_rotvec(v).as_matrix(), Rotation.from_euler("xyz", e).as_matrix(), atol=1e-6
        )


def test_zero_rotation_is_the_zero_vector_and_hand_derived_single_axis_cases():
    assert np.array_equal(euler_to_axis_angle(np.zeros(3)), np.zeros(3))
    assert np.allclose(euler_to_axis_angle([0.2, 0, 0]), [0.2, 0, 0], atol=1e-12)
    assert np.allclose(euler_to_axis_angle([0, -0.3, 0]), [0, -0.3, 0], atol=1e-12)
    assert np.allclose(euler_to_axis_angle([0, 0, 0.7]), [0, 0, 0.7], atol=1e-12)


def test_axis_angle_to_euler_inverts_the_conversion():
    rng = np.random.default_rng(2)
    for e in rng.uniform(-1.2, 1.2, (100, 3)):
        assert np.allclose(axis_angle_to_euler(euler_to_axis_angle(e)), e, atol=1e-6)


def test_robot_orientation_quaternion_matches_scipy_composition():
    center = np.array([0, 0, 0, 1.0])  # (w, x, y, z): half a turn about z
    for yaw in (-0.09, -0.03, 0.0, 0.025):
        q = np.asarray(robot_quat(yaw))
        ref = (
            Rotation.from_euler("xyz", [0, 0, yaw]) * Rotation.from_quat([*center[1:], center[0]])
        ).as_quat()
        ref_wxyz = np.array([ref[3], *ref[:3]])
        assert np.allclose(q, ref_wxyz, atol=1e-9) or np.allclose(q, -ref_wxyz, atol=1e-9)
    e = np.array([0.3, -0.2, 0.5])
    ref = Rotation.from_euler("xyz", e).as_quat()
    assert np.allclose(euler_to_quat(*e), [ref[3], *ref[:3]], atol=1e-12)


# ---- grippers ------------------------------------------------------------------------------------
def run_sticky(values, repeat=10):
    g = StickyGripper(repeat)
    return [g(v) for v in values]


def test_sticky_gripper_first_step_is_zero_then_holds_a_close_for_ten_steps():
    out = run_sticky([1.0] * 3 + [0.0] * 15)
    assert out[:3] == [0.0, 0.0, 0.0]
    assert out[3:13] == [1.0] * 10  # previous (open 1) - current (closed 0) = +1: close, held 10 steps
    assert out[13:] == [0.0] * 5  # previous is now 0: nothing to do


def test_sticky_gripper_reopens_with_minus_one_and_ignores_changes_while_holding():
    vals = [1.0, 0.0, 1.0, 0.0] + [0.0] * 8 + [1.0] * 12
    out = run_sticky(vals)
    assert out[0] == 0.0
    assert out[1:11] == [1.0] * 10  # latched at step 1; the flips at steps 2-3 cannot re-latch
    assert out[11] == 0.0  # previous = 0 (set when latched), current 0
    assert out[12:22] == [-1.0] * 10  # 0 - 1 = -1: open, held
    assert out[22:] == [0.0, 0.0]


def test_sticky_gripper_needs_more_than_half_and_previous_only_moves_on_a_latch():
    # 1 -> 0.6 is a change of 0.4: nothing fires, and previous stays 1 (CogACT's fix), so a later 0.45
    # (1 - 0.45 = 0.55 > 0.5) fires with the full difference from the last latched value.
    # Below the threshold the small relative value itself is sent, as in CogACT.
    out = run_sticky([1.0, 0.6, 0.6, 0.45, 0.45], repeat=2)
    assert out == pytest.approx([0.0, 0.4, 0.4, 0.55, 0.55])
    assert run_sticky([1.0, 0.5, 1.0]) == [0.0, 0.5, 0.0]  # exactly 0.5 is not "more than half": no latch


def test_sticky_gripper_reset_starts_a_new_episode():
    g = StickyGripper()
    g(1.0)
    assert g(0.0) == 1.0
    g.reset()
    assert g(0.0) == 0.0 and g(0.0) == 0.0


def test_widowx_gripper_is_plus_minus_one_at_one_half():
    assert [widowx_gripper(v) for v in (0.0, 0.5, 0.51, 1.0, 0.7)] == [-1.0, -1.0, 1.0, 1.0, 1.0]


def test_action_mapping_per_robot():
    a = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 1.0])
    w = SimplerActionMapping("widowx")
    n = w.to_native(a)
    assert np.allclose(n[:3], a[:3]) and np.allclose(
        n[3:6], Rotation.from_euler("xyz", a[3:6]).as_rotvec(), atol=1e-9
    )
    assert n[6] == 1.0 and w.to_native(np.r_[a[:6], 0.0])[6] == -1.0
    assert np.allclose(w.from_native(n), a, atol=1e-6)
    g = SimplerActionMapping("google_robot")
    assert [g.to_native(np.r_[a[:6], v])[6] for v in (1.0, 0.0, 0.0)] == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="relative"):
        g.from_native(n)
    with pytest.raises(ValueError, match="one \\(7,\\) action"):
        g.to_native(np.zeros((2, 7)))
    assert g.to_dict()["type"] == "simpler_google_robot"


# ---- protocol ------------------------------------------------------------------------------------
def test_messages_round_trip_with_arrays_of_several_dtypes():
    buf = io.BytesIO()
    arrays = {
        "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        "a": np.linspace(0, 1, 7),
        "e": np.zeros((0,), np.float32),
    }
    write_message(buf, {"cmd": "step", "x": [1, "two"]}, arrays)
    write_message(buf, {"cmd": "close"})
    buf.seek(0)
    h, got = read_message(buf)
    assert h == {"cmd": "step", "x": [1, "two"]}
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    assert read_message(buf) == ({"cmd": "close"}, {})
    with pytest.raises(ProtocolError, match="closed"):
        read_message(buf)


def test_truncated_and_malformed_messages_raise_protocol_errors():
    buf = io.BytesIO()
    write_message(buf, {"cmd": "step"}, {"action": np.zeros(7)})
    data = buf.getvalue()
    with pytest.raises(ProtocolError, match="array 'action'"):
        read_message(io.BytesIO(data[:-3]))
    with pytest.raises(ProtocolError, match="not JSON"):
        read_message(io.BytesIO(b"\x00\x00\x00\x03abc"))
    with pytest.raises(ProtocolError, match="cannot cross"):
        write_message(io.BytesIO(), {}, {"o": np.array([object()])})


class EchoBackend:
    def __init__(self):
        self.closed = False

    def hello(self):
        return {"protocol": 1}

    def reset(self, state, shader):
        return {"instruction": state["task"], "shader": shader}, {"image": np.zeros((2, 2, 3), np.uint8)}

    def step(self, action):
        if action[0] < 0:
            raise RuntimeError("negative x")
        return {"done": False}, {"echo": action * 2}

    def close(self):
        self.closed = True


def test_server_loop_answers_reports_errors_and_keeps_serving():
    req = io.BytesIO()
    write_message(req, {"cmd": "hello"})
    write_message(req, {"cmd": "reset", "state": {"task": "t"}, "shader": "ibl"})
    write_message(req, {"cmd": "step"}, {"action": -np.ones(7)})
    write_message(req, {"cmd": "step"}, {"action": np.ones(7)})
    write_message(req, {"cmd": "nope"})
    write_message(req, {"cmd": "close"})
    req.seek(0)
    rep, backend = io.BytesIO(), EchoBackend()
    serve(backend, req, rep)
    rep.seek(0)
    replies = [read_message(rep) for _ in range(6)]
    assert replies[0][0] == {"ok": True, "protocol": 1}
    assert replies[1][0]["instruction"] == "t" and replies[1][0]["shader"] == "ibl"
    assert (
        not replies[2][0]["ok"]
        and "negative x" in replies[2][0]["error"]
        and "Traceback" in replies[2][0]["traceback"]
    )
    assert replies[3][0]["ok"] and np.array_equal(replies[3][1]["echo"], 2 * np.ones(7))
    assert not replies[4][0]["ok"] and "unknown request" in replies[4][0]["error"]
    assert replies[5][0] == {"ok": True} and backend.closed


def test_client_talks_to_a_server_process_whose_prints_do_not_corrupt_replies(
    fake_simpler, tmp_path, monkeypatch
):
    # The fake prints to stdout at start-up: the server re-points stdout at stderr first.
    monkeypatch.setenv("FAKE_SIMPLER_FAIL_AT", "3")
    client = SimplerClient(sys.executable)
    try:
        assert client.hello["server"] == "fake-simpler"
        state = simpler.initial_state("google_robot_open_top_drawer", 0)
        rep, arrays = client.request({"cmd": "reset", "state": state.to_dict(), "shader": "ibl"})
        assert rep["instruction"] == "open top drawer" and arrays["image"].shape == (512, 640, 3)
        for _ in range(2):
            client.request({"cmd": "step"}, {"action": np.zeros(7)})
        with pytest.raises(SimplerServerError, match="fake SIMPLER failure at step 3"):
            client.request({"cmd": "step"}, {"action": np.zeros(7)})
        rep, _ = client.request({"cmd": "reset", "state": state.to_dict(), "shader": None})  # still serving
        assert rep["ok"]
        assert "fake SIMPLER server started" in client.stderr_tail()
    finally:
        client.close()
    assert client.proc.returncode == 0


def test_client_names_a_dead_server_and_its_stderr(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text("import sys\nsys.stderr.write('cannot import sapien\\n')\nsys.exit(3)\n")
    with pytest.raises(SimplerServerError, match="(?s)exit code 3.*cannot import sapien"):
        SimplerClient(sys.executable, script)


def test_missing_interpreter_is_explained(monkeypatch):
    monkeypatch.delenv(simpler.PYTHON_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="--simpler-python"):
        simpler.simpler_python(None)
    with pytest.raises(ValueError, match="does not exist"):
        simpler.simpler_python("/nonexistent/python")


# ---- the env -------------------------------------------------------------------------------------
def test_env_converts_actions_resizes_images_and_judges_success_at_the_last_step(
    fake_simpler, tmp_path, monkeypatch
):
    log = tmp_path / "actions.jsonl"
    monkeypatch.setenv("FAKE_SIMPLER_LOG", str(log))
    with SimplerEnv("google_robot_open_top_drawer", max_steps=5, shader="ibl") as env:
        obs = env.reset(env.sample_initial_state(3))
        assert obs["image"].shape == (224, 224, 3) and obs["image"].dtype == np.uint8
        assert env.instruction == "open top drawer" and env.max_steps == 5
        assert env.last_reset_info["shader"] == "ibl"
        acts = [np.array([-1.0, 0, 0, 0.1, 0.2, -0.3, g]) for g in (1.0, 0.0, 0.0, 0.0, 0.0)]
        results = [env.step(a) for a in acts]
        assert [r[2] for r in results] == [False, False, False, False, True]  # done = time limit only
        assert results[-1][3]["success"]  # pulled 5 x 5 cm
        assert results[0][3]["milestones"] == {}  # drawer tasks: no phase flags
    sent = [json.loads(line)["action"] for line in log.read_text().splitlines()]
    assert len(sent) == 5
    assert np.allclose(sent[0][3:6], Rotation.from_euler("xyz", [0.1, 0.2, -0.3]).as_rotvec(), atol=1e-9)
    assert [s[6] for s in sent] == [0.0, 1.0, 1.0, 1.0, 1.0]  # sticky close


def test_env_refuses_a_state_of_another_task(fake_simpler):
    with SimplerEnv("google_robot_open_drawer") as env:
        with pytest.raises(ValueError, match="not for simpler/google_robot_open_drawer"):
            env.reset(simpler.initial_state("google_robot_close_drawer", 0))


# ---- suites --------------------------------------------------------------------------------------
def test_named_suites_hold_the_scripts_grids():
    sizes = {s: {t: len(b()) for t, (_, b) in tasks.items()} for s, tasks in NAMED_SUITES.items()}
    assert list(sizes["google_vm"].values()) == [300, 240, 216, 108]
    assert list(sizes["google_va"].values()) == [825, 600, 378, 189]
    assert list(sizes["widowx"].values()) == [24, 24, 24, 24]
    st = simpler.initial_state("google_vm_drawer", 0)
    assert st.data["env_name"] == "OpenTopDrawerCustomInScene-v0"
    assert (
        st.data["kwargs"]["rgb_overlay"] == "open_drawer_a0.png" and st.data["kwargs"]["shader_dir"] == "rt"
    )
    assert st.data["options"]["robot_init_options"]["init_xy"] == [0.644, -0.179]
    assert InitialState.from_json(st.to_json()) == st
    coke = simpler.initial_state("google_vm_pick_coke_can", 24).data
    assert coke["options"]["obj_init_options"]["init_xy"] == pytest.approx([-0.12, 0.42])


def test_suite_names_resolve_and_bad_names_are_refused():
    assert resolve_suite("simpler:google_vm") == list(NAMED_SUITES["google_vm"])
    assert resolve_suite("simpler:bridge") == list(NAMED_SUITES["widowx"])
    assert resolve_suite("simpler:google_robot_open_drawer,google_robot_close_drawer") == [
        "google_robot_open_drawer",
        "google_robot_close_drawer",
    ]
    with pytest.raises(ValueError, match="unknown SIMPLER task"):
        resolve_suite("simpler:open_drawer")
    with pytest.raises(ValueError, match="names no task"):
        resolve_suite("simpler:")


def test_protocol_tasks_cap_episodes_at_their_grid():
    states = simpler.sample_initial_states(["widowx_vm_carrot_on_plate", "widowx_carrot_on_plate"], 30)
    by_task = {
        t: [s.seed for s in states if s.task == t]
        for t in ("widowx_vm_carrot_on_plate", "widowx_carrot_on_plate")
    }
    assert by_task["widowx_vm_carrot_on_plate"] == list(range(24))
    assert by_task["widowx_carrot_on_plate"] == list(range(30))
    with pytest.raises(ValueError, match="past its 24 protocol episodes"):
        simpler.sample_initial_states(["widowx_vm_carrot_on_plate"], 2, offset=24)


# ---- damvla eval end to end ----------------------------------------------------------------------
def eval_argv(out: Path, suite: str, *extra: str) -> list[str]:
    return ["eval", "--suite", suite, "--episodes", "2", "--max-steps", "6", "--out", str(out), "--no-progress",
            "--seed", "3", *extra]  # fmt: skip


def test_eval_random_policy_on_simpler_writes_the_full_report(fake_simpler, tmp_path):
    from damvla.cli import main

    out = tmp_path / "drawer"
    assert main(eval_argv(out, "simpler:google_robot_open_drawer", "--policy", "random", "--workers", "1",
                          "--simpler-shader", "ibl")) == 0  # fmt: skip
    for name in ("results.json", "report.md", "index.html", "initial_states.jsonl", "episodes.jsonl", "command.txt",
                 "versions.json", "videos/google_robot_open_drawer/seed-0.mp4",
                 "plots/google_robot_open_drawer/seed-0.png", "plots/google_robot_open_drawer/seed-1.png"):  # fmt: skip
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["simulator"] == "simpler" and res["config"]["camera"] == "overhead_camera"
    assert res["config"]["resolution"] == 224 and res["config"]["simpler"]["shader"] == "ibl"
    assert res["config"]["simpler"]["server"]["server"] == "fake-simpler"
    t = res["tasks"]["google_robot_open_drawer"]
    assert t["episodes"] == 2 and t["errors"] == 0 and len(t["wilson95"]) == 2
    assert [e["steps"] for e in res["episodes"]] == [6, 6]  # SIMPLER runs to the time limit
    assert all(e["instruction"].endswith("drawer") for e in res["episodes"])
    states = [json.loads(line) for line in (out / "initial_states.jsonl").read_text().splitlines()]
    assert [s["data"]["reset_seed"] for s in states] == [0, 1]
    report = (out / "report.md").read_text()
    assert "Phase flags: none" in report and "`ibl` instead of the protocol's" in report
    assert "--simpler-shader ibl" in res["command"]
    # Replaying the recorded states gives the same episodes.
    out2 = tmp_path / "replay"
    assert main(eval_argv(out2, "simpler:google_robot_open_drawer", "--policy", "random", "--workers", "0",
                          "--simpler-shader", "ibl", "--initial-states", str(out / "initial_states.jsonl"))) == 0  # fmt: skip
    res2 = json.loads((out2 / "results.json").read_text())
    assert [e["instruction"] for e in res2["episodes"]] == [e["instruction"] for e in res["episodes"]]


def test_eval_reports_phase_flags_where_simpler_has_them(fake_simpler, tmp_path):
    from damvla.cli import main

    out = tmp_path / "coke"
    assert (
        main(
            eval_argv(
                out,
                "simpler:google_vm_pick_coke_can",
                "--policy",
                "random",
                "--workers",
                "0",
                "--videos",
                "0",
            )
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert "is_grasped" in res["overall"]["milestones"]
    assert "Partial protocol: google_vm_pick_coke_can 2/300" in (out / "report.md").read_text()


def test_eval_refuses_expert_mixed_robots_and_a_camera(fake_simpler, tmp_path):
    from damvla.evaluate import EvalOptions, evaluate

    base = {"episodes": 1, "out": tmp_path / "x"}
    with pytest.raises(ValueError, match="no scripted expert"):
        evaluate(EvalOptions(suite="simpler:google_robot_open_drawer", policy="expert", **base))
    with pytest.raises(ValueError, match="one robot"):
        evaluate(
            EvalOptions(suite="simpler:google_robot_open_drawer,widowx_stack_cube", policy="random", **base)
        )
    with pytest.raises(ValueError, match="robot's own camera"):
        evaluate(EvalOptions(suite="simpler:widowx_stack_cube", policy="random", camera="corner4", **base))
    with pytest.raises(ValueError, match="apply to --suite simpler"):
        EvalOptions(suite="reach", policy="random", simpler_shader="ibl", **base).validate()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from damvla.config import preset
    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    torch.manual_seed(0)
    cfg = preset("tiny")
    meta = {"camera_keys": ["observation.images.image"], "damvla": {"gripper_index": 6}}
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), meta, load_pretrained=False)
    return policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_eval_checkpoint_uses_cogacts_ensemble_per_robot_and_logs_the_router(
    fake_simpler, tiny_ckpt, tmp_path, monkeypatch
):
    from damvla.cli import main

    log = tmp_path / "actions.jsonl"
    monkeypatch.setenv("FAKE_SIMPLER_LOG", str(log))
    out = tmp_path / "ckpt"
    assert (
        main(eval_argv(out, "simpler:widowx_stack_cube", str(tiny_ckpt), "--workers", "0", "--threads", "1"))
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["execution"] == "adaptive_ensemble" and cfg["ensemble_horizon"] == 7
    assert cfg["camera"] == "3rd_view_camera"
    assert "taken to be SIMPLER end-effector deltas" in cfg["simpler"]["checkpoint_checks"]["action_mapping"]
    assert all(e["router_weight_mean"] is not None for e in res["episodes"])
    assert (out / "plots/widowx_stack_cube/seed-0.png").is_file()
    sent = [json.loads(line)["action"] for line in log.read_text().splitlines()]
    assert len(sent) == 12 and {s[6] for s in sent} <= {-1.0, 1.0}  # WidowX gripper
    # A Google robot task defaults to K = 2.
    out2 = tmp_path / "google"
    assert (
        main(
            eval_argv(
                out2,
                "simpler:google_robot_close_drawer",
                str(tiny_ckpt),
                "--workers",
                "0",
                "--threads",
                "1",
                "--videos",
                "0",
            )
        )
        == 0
    )
    assert json.loads((out2 / "results.json").read_text())["config"]["ensemble_horizon"] == 2


def test_long_horizon_tasks_follow_the_new_instruction_and_restart_the_ensemble(
    fake_simpler, tiny_ckpt, tmp_path
):
    from damvla.cli import main
    from damvla.evaluation.executors import CheckpointExecutor
    from damvla.model.policy import DAMVLAPolicy

    out = tmp_path / "apple"
    assert main(eval_argv(out, "simpler:google_vm_put_in_drawer", str(tiny_ckpt), "--workers", "0", "--threads", "1",
                          "--videos", "0", "--plots", "0")) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert [e["instruction"] for e in res["episodes"]] == ["place apple into top drawer"] * 2
    # The executor starts a fresh queue when a slot's instruction changes (CogACT resets on a new task).
    policy = DAMVLAPolicy.from_pretrained(tiny_ckpt)
    ex = CheckpointExecutor(
        policy, ["a/seed-0"], 0, replace(policy.config.inference, execution="adaptive_ensemble")
    )
    batch = {"observation.images.image": np.zeros((1, 3, 32, 32), np.uint8), "observation.state": np.zeros((1, 0), np.float32),
             "task": ["open top drawer"], "slot": np.array([0]), "episode_start": np.array([True]),
             "episode_index": np.array([0])}  # fmt: skip
    ex(batch)
    first = ex._queues[0]
    ex({**batch, "episode_start": np.array([False])})
    assert ex._queues[0] is first
    ex({**batch, "episode_start": np.array([False]), "task": ["place apple into top drawer"]})
    assert ex._queues[0] is not first


def test_eval_refuses_a_checkpoint_of_another_simulator(fake_simpler, tiny_ckpt, tmp_path):
    import shutil

    from damvla.evaluate import EvalOptions, evaluate

    ck = tmp_path / "mw"
    shutil.copytree(tiny_ckpt, ck)
    meta = json.loads((ck / "metadata.json").read_text())
    meta["damvla"]["action_mapping"] = {"type": "metaworld_v3"}
    (ck / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not SIMPLER's google_robot"):
        evaluate(
            EvalOptions(
                suite="simpler:google_robot_open_drawer", checkpoint=str(ck), episodes=1, out=tmp_path / "o"
            )
        )


# ---- the real simulator ----------------------------------------------------------------------------
def _real_simpler_python() -> str | None:
    import os
    import subprocess

    py = os.environ.get(simpler.PYTHON_ENV_VAR)
    if not py:
        return None
    r = subprocess.run([py, "-c", "import simpler_env, sapien"], capture_output=True, timeout=600)
    return py if r.returncode == 0 else None


def test_one_real_drawer_episode_with_the_ibl_shader(tmp_path, monkeypatch):
    py = _real_simpler_python()
    if py is None:
        pytest.skip(
            "SimplerEnv is not installed here: set DAMVLA_SIMPLER_PYTHON to an interpreter that imports "
            "simpler_env and sapien (docs/simpler.md); on a CPU it also needs Mesa >= 23 lavapipe and the layer"
        )
    monkeypatch.delenv(simpler.SERVER_ENV_VAR, raising=False)
    from damvla.cli import main

    out = tmp_path / "real"
    assert main(["eval", "--policy", "random", "--suite", "simpler:google_robot_open_drawer", "--episodes", "1",
                 "--out", str(out), "--workers", "0", "--no-progress", "--simpler-python", py,
                 "--simpler-shader", "ibl", "--timeout", "1800"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    ep = res["episodes"][0]
    assert ep["error"] is None and ep["steps"] == 113 and ep["instruction"].startswith("open")
    assert (out / ep["video"]).is_file()
