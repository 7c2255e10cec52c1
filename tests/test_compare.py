import json
import shutil

import pytest

from damvla.cli import main
from damvla.compare import closed_loop_router_agreement, difference_interval, format_difference


def test_difference_interval_matches_newcombes_worked_example():
    # Newcombe (1998), method 10: 56/70 vs 48/80 -> 0.2000 [0.0524, 0.3339]
    d, lo, hi = difference_interval(56, 70, 48, 80)
    assert d == pytest.approx(0.2)
    assert lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)


def test_router_agreement_counts_steps_where_the_choice_matches_the_executed_phase():
    eps = [{"gripper_head_fraction": 0.5, "log": {"router_weight": [0.1, 0.9, 0.7, 0.2]}, "router_label": [0, 1, 0, 0]}]
    assert closed_loop_router_agreement(eps) == pytest.approx(0.75)
    assert closed_loop_router_agreement([{"log": {"router_weight": [None, None]}, "router_label": [0, 1]}]) is None


def _fake_eval(d, name, succ, reached=None):
    d.mkdir(parents=True)
    tasks = {t: {"successes": k, "episodes": 4} for t, k in succ.items()}
    total = sum(succ.values())
    res = {"tasks": tasks, "overall": {"successes": total, "episodes": 4 * len(succ)}, "command": f"damvla eval {name}"}
    if reached is not None:  # phase flags, as `damvla eval` writes them
        for t, s in tasks.items():
            s["milestones"] = {"reached": reached[t], "success": s["successes"]}
        res["overall"]["milestones"] = {"reached": sum(reached.values()), "success": total}
    (d / "results.json").write_text(json.dumps(res))
    (d / "initial_states.jsonl").write_text('{"seed": 1}\n')


def test_compare_writes_a_section_with_the_difference_to_the_baseline(tmp_path):
    _fake_eval(tmp_path / "a", "a", {"push-v3": 3, "reach-v3": 4}, reached={"push-v3": 4, "reach-v3": 4})
    _fake_eval(tmp_path / "b", "b", {"push-v3": 1, "reach-v3": 4}, reached={"push-v3": 2, "reach-v3": 3})
    page = tmp_path / "results.md"
    code = main(["compare", "--run", f"dam={tmp_path / 'a'}", "--run", f"base={tmp_path / 'b'}",
                 "--baseline", "base", "--title", "A vs B", "--append-results", str(page), "--figures", str(tmp_path)])
    assert code == 0
    text = page.read_text()
    assert "75% (3/4)" in text and "25% (1/4)" in text and "| dam | +50" in text
    assert "damvla eval a" in text and "<!-- damvla-eval:begin a-vs-b -->" in text
    assert "| dam | reached | 4/4 | 4/4 | 8/8 |" in text and "| base | reached | 2/4 | 3/4 | 5/8 |" in text
    assert "| base | success | 1/4 | 4/4 | 5/8 |" in text
    with pytest.raises(SystemExit):
        main(["compare", "--title", "x"])
    assert main(["compare", "--run", f"x={tmp_path / 'missing'}", "--title", "t"]) == 1


def test_runs_named_row_slash_seed_are_pooled_per_row_with_the_difference_on_pooled_counts(tmp_path):
    _fake_eval(tmp_path / "a0", "a0", {"push-v3": 3, "reach-v3": 4}, reached={"push-v3": 4, "reach-v3": 4})
    _fake_eval(tmp_path / "a1", "a1", {"push-v3": 1, "reach-v3": 4}, reached={"push-v3": 4, "reach-v3": 4})
    _fake_eval(tmp_path / "b0", "b0", {"push-v3": 0, "reach-v3": 2}, reached={"push-v3": 1, "reach-v3": 3})
    page = tmp_path / "results.md"
    runs = [f"dam/s0={tmp_path / 'a0'}", f"dam/s1={tmp_path / 'a1'}", f"cog/s0={tmp_path / 'b0'}"]
    args = ["compare", *[x for r in runs for x in ("--run", r)], "--baseline", "cog", "--title", "pooled",
            "--append-results", str(page), "--figures", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    text = page.read_text()
    # dam pooled: push 4/8, reach 8/8, all 12/16; seeds' averages 88% and 62%
    assert "| dam | 2 | 50% (4/8)" in text and "75% (12/16)" in text and "88%, 62%" in text
    assert "| cog | 1 | 0% (0/4)" in text
    assert "| dam | +50" in text  # push: 4/8 - 0/4
    assert "16/16 vs 4/8: +50" in text  # reached, pooled


def test_compare_refuses_an_interrupted_evaluation(tmp_path, capsys):
    _fake_eval(tmp_path / "a", "a", {"push-v3": 3})
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    (tmp_path / "a" / "results.json").write_text(json.dumps({**res, "complete": False, "episodes_planned": 8}))
    assert main(["compare", "--run", f"a={tmp_path / 'a'}", "--title", "t", "--figures", str(tmp_path)]) == 1
    assert "interrupted evaluation" in capsys.readouterr().err


def _fake_train(d, seed):
    ckpt = d / "checkpoints" / "step-0000010"
    ckpt.mkdir(parents=True)
    (d / "checkpoints" / "latest").write_text("step-0000010")
    train = {"preset": "cpu", "dataset": "/data/grip3", "out": str(d), "steps": 10, "batch_size": 4, "lr": 3e-4,
             "warmup": 0, "schedule": "cosine", "seed": seed, "ablation": "damvla", "overrides": ["state_dim=4"]}
    (ckpt / "train_config.json").write_text(json.dumps({"train": train}))
    (ckpt / "metadata.json").write_text(json.dumps({"step": 10}))
    (ckpt / "model.safetensors").write_bytes(b"weights are not part of a record")
    rows = [{"step": s, "loss": 1.0 / s, "loss_arm": 0.5 / s, "loss_gripper": 0.5 / s, "router_acc": 0.9} for s in (5, 10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_kept_records_stand_in_for_the_run_folders_and_give_the_same_section(tmp_path):
    _fake_eval(tmp_path / "e0", "e0", {"push-v3": 3}, reached={"push-v3": 4})
    _fake_eval(tmp_path / "e1", "e1", {"push-v3": 1}, reached={"push-v3": 2})
    (tmp_path / "e0" / "episodes.jsonl").write_text(json.dumps({"log": {"router_weight": [0.9, 0.1]}, "router_label": [1, 1]}) + "\n")
    _fake_train(tmp_path / "t0", 0)
    records = tmp_path / "records"

    def compare(runs, page):
        args = ["compare", *[x for r in runs for x in ("--run", r)], "--baseline", "cog", "--title", "t",
                "--append-results", str(page), "--figures", str(tmp_path / "fig")]  # fmt: skip
        assert main(args + ["--keep-records", str(records)]) == 0
        return page.read_text()

    direct = compare([f"dam/s0={tmp_path / 'e0'}:{tmp_path / 't0'}", f"cog/s0={tmp_path / 'e1'}"], tmp_path / "a.md")
    assert sorted(p.name for p in records.iterdir()) == ["cog_s0", "dam_s0"]
    assert not list(records.rglob("model.safetensors"))  # no weights in a record
    assert "50.0%" in direct and "--seed 0" in direct  # router agreement from the episodes; the train command
    # The run folders can go: the records alone rebuild the same section.
    for d in ("e0", "e1", "t0"):
        shutil.rmtree(tmp_path / d)
    again = compare([f"dam/s0={records / 'dam_s0'}", f"cog/s0={records / 'cog_s0'}"], tmp_path / "b.md")
    assert again == direct


def test_a_training_run_is_kept_once_and_rows_sharing_it_refer_to_that_copy(tmp_path):
    # An inference sweep: two evaluations of one training run; then a table in another records folder that
    # reads one of them back. Each training folder is copied once; the other rows refer to it.
    _fake_eval(tmp_path / "e0", "e0", {"push-v3": 3}, reached={"push-v3": 4})
    _fake_eval(tmp_path / "e1", "e1", {"push-v3": 1}, reached={"push-v3": 2})
    _fake_train(tmp_path / "t0", 0)
    sweep, other = tmp_path / "records" / "sweep", tmp_path / "records" / "other"

    def compare(runs, page, records):
        args = ["compare", *[x for r in runs for x in ("--run", r)], "--baseline", "chunk", "--title", "t",
                "--append-results", str(page), "--figures", str(tmp_path / "fig"), "--keep-records", str(records)]  # fmt: skip
        assert main(args) == 0
        return page.read_text()

    direct = compare([f"chunk={tmp_path / 'e0'}:{tmp_path / 't0'}", f"ensemble={tmp_path / 'e1'}:{tmp_path / 't0'}"],
                     tmp_path / "a.md", sweep)  # fmt: skip
    assert (sweep / "chunk" / "train" / "metrics.jsonl").is_file()
    assert not (sweep / "ensemble" / "train").exists()
    assert json.loads((sweep / "ensemble" / "record.json").read_text())["train_record"] == "../chunk/train"
    compare([f"ensemble={sweep / 'ensemble'}", f"chunk={sweep / 'chunk'}"], tmp_path / "b.md", other)
    for row in ("chunk", "ensemble"):  # neither evaluation nor training copied again
        info = json.loads((other / row / "record.json").read_text())
        assert sorted(p.name for p in (other / row).iterdir()) == ["record.json"]
        assert info["eval_record"] == f"../../sweep/{row}/eval" and info["train_record"] == "../../sweep/chunk/train"
    for d in ("e0", "e1", "t0"):
        shutil.rmtree(tmp_path / d)
    assert compare([f"chunk={sweep / 'chunk'}", f"ensemble={sweep / 'ensemble'}"], tmp_path / "c.md", sweep) == direct
    assert compare([f"chunk={other / 'chunk'}", f"ensemble={other / 'ensemble'}"], tmp_path / "d.md", other) == direct
    shutil.rmtree(sweep / "chunk")  # a reference to a deleted record fails with what to do
    assert main(["compare", "--run", f"ensemble={other / 'ensemble'}", "--title", "t", "--figures", str(tmp_path)]) == 1


def test_a_difference_bound_that_rounds_to_zero_keeps_its_sign_and_one_decimal():
    assert format_difference(0.04, -0.003, 0.09) == "+4 [-0.3, +9]"
    assert format_difference(0.0, -0.05, 0.05) == "+0 [-5, +5]"  # an exact zero stays a whole number
    assert format_difference(0.12, 0.004, 0.2) == "+12 [+0.4, +20]"


def test_reproduction_commands_name_init_and_the_data_recipe_options(tmp_path):
    """A fine-tuned run reproduces with --init (no --preset / --ablation); a DAgger or DART dataset with the
    collect options that made it."""
    from damvla.compare import _collect_command, _train_command

    _fake_train(tmp_path / "t", 0)
    ckpt = tmp_path / "t" / "checkpoints" / "step-0000010"
    assert _train_command(tmp_path / "t").startswith("damvla train --preset cpu --dataset /data/grip3")
    cfg = json.loads((ckpt / "train_config.json").read_text())
    cfg["train"]["init"] = "/runs/first/checkpoints/step-0009000"
    (ckpt / "train_config.json").write_text(json.dumps(cfg))
    cmd = _train_command(tmp_path / "t")
    assert cmd.startswith("damvla train --init /runs/first/checkpoints/step-0009000 --dataset /data/grip3")
    assert "--preset" not in cmd and "--ablation" not in cmd and "--aug" not in cmd
    cfg["train"].update(aug_shift=0.06, aug_views=3, weight_decay=0.0)  # a default stays unnamed
    (ckpt / "train_config.json").write_text(json.dumps(cfg))
    cmd = _train_command(tmp_path / "t")
    assert "--aug-shift 0.06 --aug-views 3" in cmd and "--weight-decay" not in cmd
    recipe = {"simulator": "metaworld_v3", "suite": "grip3", "episodes_per_task": 10, "camera": "corner4",
              "resolution": 128, "release": False, "max_steps": 300, "seed_offset": 0, "max_tries": 30,
              "policy": "/runs/first/checkpoints/step-0009000", "beta": 0.0, "from": "/data/grip3"}  # fmt: skip
    (ckpt / "metadata.json").write_text(json.dumps({"source": "/data/dagger", "damvla": {"recipe": recipe}}))
    assert _collect_command(tmp_path / "t") == (
        "damvla collect metaworld --suite grip3 --episodes 10 --out /data/dagger --camera corner4 --resolution 128 "
        "--max-steps 300 --policy /runs/first/checkpoints/step-0009000 --from /data/grip3"
    )
    recipe.update(policy=None, noise=0.3, max_tries=250, **{"from": None})
    (ckpt / "metadata.json").write_text(json.dumps({"source": "/data/dart", "damvla": {"recipe": recipe}}))
    assert _collect_command(tmp_path / "t").endswith("--max-steps 300 --noise 0.3 --max-tries 250")
    recipe.update(noise=None, max_tries=30, environment_state=True, extra_cameras=["corner4", "corner2"])
    (ckpt / "metadata.json").write_text(json.dumps({"source": "/data/two", "damvla": {"recipe": recipe}}))
    assert _collect_command(tmp_path / "t").endswith("--max-steps 300 --environment-state --extra-cameras corner4,corner2")


def _placed_eval(d, name, outcomes):
    """An eval folder whose episodes carry Meta-World initial states: outcomes = [(object x, goal z, success)]."""
    d.mkdir(parents=True)
    episodes, states = [], []
    for seed, (x, z, ok) in enumerate(outcomes):
        episodes.append({"task": "pick-place-v3", "seed": seed, "success": ok, "milestones": {"reached": ok or x > 0}})
        data = {"obj_init_pos": [x, 0.65, 0.02], "goal_pos": [0.0, 0.85, z]}
        states.append(json.dumps({"data": data, "seed": seed, "simulator": "metaworld_v3", "task": "pick-place-v3"}))
    k = sum(o[2] for o in outcomes)
    res = {"tasks": {"pick-place-v3": {"successes": k, "episodes": len(outcomes), "milestones": {"reached": 0, "success": k}}},
           "overall": {"successes": k, "episodes": len(outcomes), "milestones": {"reached": 0, "success": k}},
           "command": f"damvla eval {name}", "episodes": episodes}  # fmt: skip
    (d / "results.json").write_text(json.dumps(res))
    (d / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (d / "initial_states.jsonl").write_text("\n".join(states) + "\n")


def test_episodes_are_split_by_where_the_object_starts_and_the_goal_is_pooled_over_seeds(tmp_path):
    # seed 0: left-side objects (x < 0) all fail; high goals (z >= 0.18) all fail
    _placed_eval(tmp_path / "s0", "s0", [(-0.1, 0.05, False), (-0.05, 0.1, False), (0.05, 0.1, True), (0.1, 0.31, False)])
    _placed_eval(tmp_path / "s1", "s1", [(-0.1, 0.31, False), (-0.05, 0.1, True), (0.05, 0.1, True), (0.1, 0.05, True)])
    page = tmp_path / "results.md"
    args = ["compare", "--run", f"dam/s0={tmp_path / 's0'}", "--run", f"dam/s1={tmp_path / 's1'}", "--title", "where",
            "--append-results", str(page), "--figures", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    text = page.read_text()
    assert "Where in the workspace" in text
    # object x, pooled: below 1/4, at or above 3/4 (+50); reached: below only where it succeeded, above all
    assert "| dam | pick-place-v3 | object x = 0 cm | 25% (1/4) [5, 70] | 75% (3/4) [30, 95] | +50" in text
    assert "| 1/4 / 4/4 |" in text
    # goal z split at the middle of [0.05, 0.31]: 18 cm; below 4/6, at or above 0/2
    assert "| dam | pick-place-v3 | goal z = 18 cm | 67% (4/6) [30, 90] | 0% (0/2) [0, 66] | -67" in text
    # how far sideways the goal (x = 0) lies from the object: |x| split at 7.5 cm; near 3/4, far 1/4
    assert "| dam | pick-place-v3 | goal-object x distance = 8 cm | 75% (3/4) [30, 95] | 25% (1/4) [5, 70] | -50" in text
    # no positions recorded (SIMPLER, or older evaluations): no split table
    _fake_eval(tmp_path / "plain", "plain", {"push-v3": 3})
    assert main(["compare", "--run", f"p={tmp_path / 'plain'}", "--title", "plain", "--append-results", str(page),
                 "--figures", str(tmp_path)]) == 0  # fmt: skip
    assert page.read_text().count("Where in the workspace") == 1


def test_paired_interval_is_newcombes_and_narrows_when_two_policies_solve_the_same_states():
    from damvla.evaluation.stats import mcnemar_exact_p, paired_difference_interval

    # no association beyond Newcombe's n/2 allowance: the paired interval is the unpaired one
    assert paired_difference_interval(5, 5, 5, 5) == pytest.approx(difference_interval(10, 20, 10, 20))
    # 88 solved by both, 11 by the row alone, 7 by the baseline alone: +2.7 points either way
    d, lo, hi = paired_difference_interval(88, 11, 7, 44)
    _, ulo, uhi = difference_interval(99, 150, 95, 150)
    assert d == pytest.approx(4 / 150) and ulo < lo < 0 < hi < uhi
    # every discordant episode one way: the interval leaves 0 out
    assert paired_difference_interval(14, 5, 0, 22)[1] > 0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32) and mcnemar_exact_p(11, 7) == pytest.approx(0.4807, abs=1e-4)
    assert mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        paired_difference_interval(0, 0, 0, 0)


def test_runs_on_the_same_states_get_a_paired_difference_seed_with_seed(tmp_path):
    outcomes = {  # per seed: the row's and the baseline's success on 4 shared states of one task
        "s0": ([1, 1, 1, 0], [1, 0, 0, 0]),
        "s1": ([1, 1, 0, 0], [1, 1, 0, 0]),
    }
    runs = []
    for seed, (mine, base) in outcomes.items():
        for row, succ in (("dam", mine), ("cog", base)):
            d = tmp_path / f"{row}{seed}"
            _fake_eval(d, row, {"push-v3": sum(succ)})
            (d / "episodes.jsonl").write_text("".join(
                json.dumps({"task": "push-v3", "key": f"push-v3/seed-{i}", "success": bool(s)}) + "\n"
                for i, s in enumerate(succ)))  # fmt: skip
            runs += ["--run", f"{row}/{seed}={d}"]
    page = tmp_path / "results.md"
    assert main(["compare", *runs, "--baseline", "cog", "--title", "paired", "--append-results", str(page),
                 "--figures", str(tmp_path)]) == 0  # fmt: skip
    text = page.read_text()
    assert "Paired with `cog` on the same initial states" in text
    # 8 pairs: both 3 (s0: 1, s1: 2), only dam 2 (s0), only cog 0, neither 3; McNemar p = 2/4
    row = next(line for line in text.splitlines() if line.startswith("| dam | s0, s1 |"))
    assert row.startswith("| dam | s0, s1 | 8 | 3 | 2 | 0 | 3 | +25") and row.endswith("| 0.5 |")
    # runs named without a seed (e.g. inference settings of one checkpoint) pair run with run
    solo = ["--run", f"dam={tmp_path / 'dams0'}", "--run", f"cog={tmp_path / 'cogs0'}"]
    assert main(["compare", *solo, "--baseline", "cog", "--title", "solo", "--append-results", str(page),
                 "--figures", str(tmp_path)]) == 0  # fmt: skip
    assert "| dam | one run | 4 | 1 | 2 | 0 | 1 |" in page.read_text().split("## solo")[1]
    # different initial states cannot be paired
    (tmp_path / "cogs1" / "initial_states.jsonl").write_text('{"seed": 2}\n')
    assert main(["compare", *runs, "--baseline", "cog", "--title", "unpaired", "--append-results", str(page),
                 "--figures", str(tmp_path)]) == 0  # fmt: skip
    assert "Paired with" not in page.read_text().split("## unpaired")[1]
