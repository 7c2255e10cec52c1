"""`damvla eval` end to end with a tiny random-weight checkpoint: report files, consistent numbers,
determinism, and the input checks that must fail before any rollout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

from damvla.cli import main  # noqa: E402
from damvla.config import preset  # noqa: E402
from damvla.envs.metaworld import dataset_action_mapping  # noqa: E402
from damvla.evaluate import EvalOptions, evaluate  # noqa: E402
from damvla.model.policy import DAMVLAPolicy  # noqa: E402
from damvla.normalize import ActionNormalizer  # noqa: E402

pytestmark = pytest.mark.sim

TASKS = ["reach-v3", "pick-place-v3"]


def metadata(tasks=TASKS) -> dict:
    """What a checkpoint trained on `damvla collect metaworld` data carries (the parts eval reads)."""
    return {
        "camera_keys": ["observation.images.image"],
        "damvla": {
            "gripper_index": 6,
            "action_mapping": dataset_action_mapping(tasks),
            # 64 px keeps rendering cheap; the policy input is resized to the model's 112 px.
            "recipe": {
                "camera": "corner4",
                "resolution": 64,
                "seed_offset": 0,
                "seeds": {t: [0, 1, 2] for t in tasks},
            },
        },
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), metadata(), load_pretrained=False)
    return policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def edited(ckpt: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    meta = json.loads((out / "metadata.json").read_text())
    edit(meta)
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def run_eval(ckpt: Path, out: Path, *extra: str) -> dict:
    argv = [
        "eval",
        str(ckpt),
        "--suite",
        "reach,pick-place",
        "--episodes",
        "2",
        "--max-steps",
        "6",
        "--execution",
        "chunk",
        "--execute-steps",
        "3",
        "--seed",
        "5",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]  # fmt: skip  (one thread: a tiny model on a busy 2-core machine)
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_tiny_checkpoint_eval_writes_consistent_reports_and_repeats_exactly(ckpt, tmp_path):
    page = tmp_path / "results.md"
    res = run_eval(
        ckpt,
        tmp_path / "a",
        "--workers",
        "2",
        "--videos",
        "1",
        "--append-results",
        str(page),
        "--title",
        "tiny",
    )
    out = tmp_path / "a"
    for name in (
        "results.json",
        "report.md",
        "command.txt",
        "versions.json",
        "initial_states.jsonl",
        "episodes.jsonl",
    ):
        assert (out / name).is_file(), name
    versions = json.loads((out / "versions.json").read_text())
    assert {"damvla", "torch", "mujoco", "metaworld", "git_commit"} <= set(versions)
    assert (out / "command.txt").read_text().startswith(f"damvla eval {ckpt} --policy checkpoint")

    assert list(res["tasks"]) == TASKS and len(res["episodes"]) == 4
    for task, s in res["tasks"].items():
        eps = [e for e in res["episodes"] if e["task"] == task]
        assert s["episodes"] == len(eps) == 2 and s["errors"] == 0
        assert s["successes"] == sum(e["success"] for e in eps)
        assert s["success_rate"] == s["successes"] / s["episodes"]
        lo, hi = s["wilson95"]
        assert 0 <= lo <= s["success_rate"] <= hi <= 1
        assert (s["mean_steps_to_success"] is None) == (s["successes"] == 0)
        assert s["steps"] == sum(e["steps"] for e in eps) and s["policy_ms_per_step"] > 0
        assert (
            f"| {task} | {100 * s['success_rate']:.1f}% ({s['successes']}/2) |"
            in (out / "report.md").read_text()
        )
        # phase flags: per-task counts agree with the episodes, success last, and the report shows them
        assert list(s["milestones"]) == ["reached", "grasped", "success"]
        assert s["milestones"]["success"] == s["successes"]
        for name in ("reached", "grasped"):
            assert s["milestones"][name] == sum(e["milestones"][name] for e in eps)
        m = s["milestones"]
        failed = [e for e in eps if not e["success"]]
        g = s["goal_distance_failed"]
        assert g["failed"] == len(failed) and all(e["goal_distance"]["min"] <= e["goal_distance"]["final"] for e in eps)
        if failed:
            assert g["median_final_cm"] == round(100 * float(np.median([e["goal_distance"]["final"] for e in failed])), 1)
        if task == "pick-place-v3":  # the distance is the object's: which way it missed, at its closest step
            for e in eps:
                gd = e["goal_distance"]
                assert np.linalg.norm(gd["offset_min"]) == pytest.approx(gd["min"], abs=1e-6)
                assert np.linalg.norm(gd["offset_final"]) == pytest.approx(gd["final"], abs=1e-6)
            if failed:
                offsets = np.asarray([e["goal_distance"]["offset_min"] for e in failed])
                assert g["median_offset_min_cm"] == [round(100 * float(v), 1) for v in np.median(offsets, axis=0)]
        else:  # reach-v3 measures from the hand: no object offset
            assert all("offset_min" not in e["goal_distance"] for e in eps) and "median_offset_min_cm" not in g
        offset = g.get("median_offset_min_cm")
        offset_cell = None if offset is None else "(" + ", ".join(f"{v:+.1f}" for v in offset) + ")"
        cells = [task, *("-" if c is None else str(c) for c in (g["failed"], g["median_min_cm"], g["median_final_cm"], offset_cell))]
        assert "| " + " | ".join(cells) + " |" in (out / "report.md").read_text()
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in (out / "index.html").read_text()
        assert f"| {task} | {m['reached']}/2 | {m['grasped']}/2 | {m['success']}/2 |" in (out / "report.md").read_text()
        # where the hand went, over the episodes that never reached the object
        h = s["hand_object_unreached"]
        unreached = [e for e in failed if not e["milestones"]["reached"]]
        assert h["unreached"] == len(unreached)
        if unreached:
            offsets = np.asarray([e["hand_object"]["offset_min"] for e in unreached])
            assert h["median_offset_min_cm"] == [round(100 * float(v), 1) for v in np.median(offsets, axis=0)]
            assert h["median_min_cm"] == round(100 * float(np.median([e["hand_object"]["min"] for e in unreached])), 1)
            cells = [task, str(h["unreached"]), str(h["median_min_cm"]),
                     "(" + ", ".join(f"{v:+.1f}" for v in h["median_offset_min_cm"]) + ")"]  # fmt: skip
            assert "| " + " | ".join(cells) + " |" in (out / "report.md").read_text()
            assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in (out / "index.html").read_text()
    # where in the workspace: each varying coordinate of each task split at the middle of its states' range
    states = {(json.loads(x)["task"], json.loads(x)["seed"]): json.loads(x)["data"]
              for x in (out / "initial_states.jsonl").read_text().splitlines()}  # fmt: skip
    for split in res["placement"]:
        eps = [e for e in res["episodes"] if e["task"] == split["task"]]
        value = {"object x": lambda d: d["obj_init_pos"][0], "goal z": lambda d: d["goal_pos"][2],
                 "goal-object x distance": lambda d: abs(d["goal_pos"][0] - d["obj_init_pos"][0])}[split["coordinate"]]  # fmt: skip
        below = [e for e in eps if value(states[e["task"], e["seed"]]) < split["threshold_m"]]
        assert split["episodes"] == [len(below), len(eps) - len(below)] and below and len(below) < len(eps)
        assert split["successes"][0] == sum(e["success"] for e in below)
        assert f"| {split['task']} | {split['coordinate']} = " in (out / "report.md").read_text()
    assert {s["task"] for s in res["placement"]} == set(TASKS)  # both tasks draw their object's x
    assert 'id="placement"' in (out / "index.html").read_text()
    ov = res["overall"]
    assert ov["success_rate"] == np.mean([s["success_rate"] for s in res["tasks"].values()])
    assert res["seeds"]["initial_state_seeds"] == {t: [1_000_000, 1_000_001] for t in TASKS}
    assert res["config"]["execution"] == "chunk" and res["config"]["execute_steps"] == 3
    assert res["config"]["resolution"] == 64 and res["config"]["camera"] == "corner4"
    assert res["timing"]["policy_calls"] >= 2  # 2 chunks per 6-step episode, batched across slots
    assert res["config"]["checkpoint_folder"] == str(ckpt.resolve()) and res["config"]["checkpoint_step"] is None
    report_md = (out / "report.md").read_text()
    assert "](videos/pick-place-v3/seed-1000000.mp4)" in report_md and "](plots/reach-v3/seed-1000001.png)" in report_md
    assert 'src="videos/reach-v3/seed-1000000.mp4"' in (out / "index.html").read_text()

    lines = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    for ep in lines:
        w = ep["log"]["router_weight"]
        assert len(w) == ep["steps"] == len(ep["router_label"]) and all(0 < x < 1 for x in w)
    videos = sorted(p.relative_to(out).as_posix() for p in out.glob("videos/*/*.mp4"))
    assert videos == [f"videos/{t}/seed-1000000.mp4" for t in sorted(TASKS)]
    import av

    with av.open(str(out / videos[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6
    assert len(list(out.glob("plots/*/*.png"))) == 4
    assert "damvla-eval:begin tiny" in page.read_text()

    # Same command again (other worker count = other batch composition): the same episodes.
    again = run_eval(
        ckpt,
        tmp_path / "b",
        "--workers",
        "1",
        "--videos",
        "0",
        "--plots",
        "0",
        "--append-results",
        str(page),
        "--title",
        "tiny",
    )
    assert [(e["key"], e["success"], e["steps"]) for e in again["episodes"]] == [
        (e["key"], e["success"], e["steps"]) for e in res["episodes"]
    ]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "episodes.jsonl").read_text().splitlines()]
    for x, y in zip(lines, lines_b):
        np.testing.assert_allclose(x["log"]["router_weight"], y["log"]["router_weight"], atol=1e-5)
    assert page.read_text().count("damvla-eval:begin tiny") == 1  # the rerun replaced its section


def test_random_policy_eval_repeats_exactly_without_a_checkpoint(tmp_path):
    a = EvalOptions(suite="reach", episodes=2, out=tmp_path / "a", policy="random", workers=0, max_steps=30,
                    videos=0, plots=0, seed=1, progress=False)  # fmt: skip
    ra = evaluate(a)
    rb = evaluate(EvalOptions(**{**a.__dict__, "out": tmp_path / "b", "workers": 1}))
    strip = [(e["key"], e["success"], e["steps"]) for e in ra["episodes"]]
    assert strip == [(e["key"], e["success"], e["steps"]) for e in rb["episodes"]]
    la = (tmp_path / "a" / "episodes.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["log"]["gripper"] for x in la] == [json.loads(x)["log"]["gripper"] for x in lb]


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_file", "lacks"),
        ("no_mapping", "action_mapping"),
        ("other_simulator", "does not match the environment"),
        ("task_not_in_mapping", "no closing effort for task 'pick-place-v3'"),
        ("camera", "differs from the camera"),
        ("seed_overlap", "used in training"),
        ("unknown_task", "unknown Meta-World task"),
        ("no_checkpoint", "give a CHECKPOINT"),
    ],
)
def test_bad_input_fails_before_any_rollout(ckpt, tmp_path, capsys, case, match):
    path, extra, suite = ckpt, [], "reach,pick-place"
    if case == "missing_file":
        path = tmp_path / "partial"
        shutil.copytree(ckpt, path)
        (path / "model.safetensors").unlink()
    elif case == "no_mapping":
        path = edited(ckpt, tmp_path, lambda m: m["damvla"].pop("action_mapping"))
    elif case == "other_simulator":
        path = edited(ckpt, tmp_path, lambda m: m["damvla"]["action_mapping"].update(type="libero"))
    elif case == "task_not_in_mapping":
        path = edited(
            ckpt, tmp_path, lambda m: m["damvla"].update(action_mapping=dataset_action_mapping(["reach-v3"]))
        )
    elif case == "camera":
        extra = ["--camera", "corner3"]
    elif case == "seed_overlap":
        path = edited(
            ckpt, tmp_path, lambda m: m["damvla"]["recipe"]["seeds"].update({"reach-v3": [1_000_001]})
        )
    elif case == "unknown_task":
        suite = "reach,pick-and-juggle"
    out = tmp_path / "out"
    argv = ["eval"] + ([] if case == "no_checkpoint" else [str(path)])
    argv += ["--suite", suite, "--episodes", "2", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 1
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing ran, nothing written


def test_action_dim_mismatch_is_refused(tmp_path, capsys):
    cfg = preset("tiny")
    cfg.action_dim, cfg.gripper_index = 6, 5
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(6), metadata(), load_pretrained=False)
    path = policy.save_pretrained(tmp_path / "six")
    assert (
        main(
            [
                "eval",
                str(path),
                "--suite",
                "reach",
                "--episodes",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "action_dim=6" in capsys.readouterr().err


def test_sampling_overrides_replace_the_checkpoints_guidance_and_ddim_steps(ckpt, tmp_path):
    """--cfg-scale 1 --inference-steps 2: two unguided DDIM steps (one head call each, not two), recorded."""
    from damvla.evaluate import apply_sampling_overrides

    policy = DAMVLAPolicy.from_pretrained(ckpt).eval()
    cfg = policy.config
    assert (cfg.diffusion.cfg_scale, cfg.diffusion.inference_steps) != (1.0, 2)
    opts = EvalOptions(suite="reach", episodes=1, out=tmp_path / "x", checkpoint=str(ckpt), cfg_scale=1.0, inference_steps=2)
    apply_sampling_overrides(policy, opts)
    rows = []
    hooks = [h.register_forward_hook(lambda _m, i, _o: rows.append(i[0].shape[0])) for h in policy.heads.values()]
    s = cfg.vision.image_size
    batch = {"observation.images.image": torch.zeros(3, 3, s, s, dtype=torch.uint8), "task": ["reach the goal"] * 3}
    if cfg.state_dim:
        batch["observation.state"] = torch.zeros(3, cfg.state_dim)
    policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert sum(rows) == 2 * 3  # 2 steps, 3 rows, no unconditional half
    res = run_eval(ckpt, tmp_path / "o", "--cfg-scale", "1", "--inference-steps", "2", "--videos", "0", "--plots", "0")
    assert res["config"]["cfg_scale"] == 1.0 and res["config"]["inference_steps"] == 2
    assert "--cfg-scale 1.0 --inference-steps 2" in (tmp_path / "o" / "command.txt").read_text()
    with pytest.raises(ValueError, match="--policy checkpoint only"):
        EvalOptions(suite="reach", episodes=1, out=tmp_path / "y", policy="random", cfg_scale=2.0).validate()
