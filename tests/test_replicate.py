"""The prepared GPU run of the replication (benchmarks/gpu_run.sh), dry-run at smoke scale on the CPU.

It checks the plumbing, not the science: every phase runs, every arm is trained and scored, the budget sweep is
evaluated along one run, what a GPU call brings back fits its limits, and a rerun continues instead of redoing."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import replicate  # noqa: E402


def _run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), SCALE="smoke", DEVICE="cpu", BUDGET="900", EVAL_RESERVE="0",
               REP=str(tmp_path / "rep"))
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    log = (tmp_path / "out" / "replicate.log").read_text()
    assert proc.returncode == 0 and "replicate rc=0" in log, log[-3000:]
    return [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]


def test_gpu_run_dry_run_trains_and_scores_every_arm_and_resumes(tmp_path):
    rows = _run(tmp_path)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 << 20 for f in files), files
    assert {"rows.jsonl", "results.md", "report.tgz", "best-ledit.tgz", "shapes-dit-base.pt",
            "replicate.log", "check.log", "machine.txt"} == set(files)
    cfg = replicate.SCALES["smoke"]
    arms = {r["arm"] for r in rows}
    assert replicate.scored_names() == arms
    # Table 2 in miniature: the RoPE fine-tune with every scaling and the base's table with every one, at each size
    for name in ["rope"] + [replicate.scaled_name("rope", m) for m in replicate.ARMS["rope"]["scalings"]]:
        assert {r["resolution"] for r in rows if r["arm"] == name and r["budget"] == cfg["main_budget"]} == \
            {"32", "48", "64", "48x64"}, name
    for scaling in replicate.BASE_SCALINGS:
        assert {r["resolution"] for r in rows if r["arm"] == replicate.scaled_name("dit", scaling)} == \
            {"48", "64", "48x64"}
    # at the base size every scaling is the plain model: the same samples, so the same scores
    at32 = {r["arm"]: r["fid"] for r in rows if r["resolution"] == "32" and r["budget"] == cfg["main_budget"]
            and r["weights"] == "ema" and r["arm"].startswith("rope")}
    assert max(at32.values()) - min(at32.values()) < 1e-3 * max(at32.values()), at32
    # every trained arm: EMA at every size and raw weights at the base size and 2x, at its final budget
    for name in replicate.PHASE1:
        mine = {(r["weights"], r["resolution"]) for r in rows if r["arm"] == name and r["budget"] == cfg["main_budget"]}
        assert {("ema", "32"), ("ema", "48"), ("ema", "64"), ("ema", "48x64"), ("raw", "32"), ("raw", "64")} == mine
    # the budget sweep: one run per sweep arm, scored at every sweep point
    for name in replicate.SWEEP_ARMS:
        assert sorted({r["budget"] for r in rows if r["arm"] == name and r["seed"] == 0}) == cfg["sweep"]
    assert {r["seed"] for r in rows if r["arm"] in replicate.PHASE3_SEEDED} == {0, 1}
    base_rows = [r for r in rows if r["arm"] == "base"]
    assert [r["budget"] for r in base_rows] == [cfg["base_budget"] // 4, cfg["base_budget"] // 2, cfg["base_budget"]]
    at_base = [r for r in rows if r["arm"] == "ledit" and r["resolution"] == "32"]
    for r in at_base:  # the held-out loss and the position probe come with every base-size row
        assert r["heldout_loss"] > 0 and -1.0 <= r["probe_row_r2_mid"] <= 1.0 and "probe_col_r2_in" in r
        assert 0.0 <= r["object_rate"] <= 1.0 and r["samples"] == cfg["samples"]
    results = (out / "results.md").read_text()
    for heading in ("Table 2 in miniature", "DiT-RoPE, VisionYaRN", "Scan ablation", "Budget curve", "Raw against EMA",
                    "probe_row_r2_mid"):
        assert heading in results
    with tarfile.open(out / "best-ledit.tgz") as tar:
        names = tar.getnames()
    assert "best-ledit/config.json" in names and "best-ledit/evaluation.json" in names
    with tarfile.open(out / "report.tgz") as tar:
        names = tar.getnames()
    assert "budget_object_rate.png" in names and "grid_64.png" in names and "base/provenance.json" in names
    # a rerun finds everything done: no new rows
    again = _run(tmp_path)
    assert len(again) == len(rows)


def test_every_attention_path_the_gpu_check_covers_builds_and_steps_on_the_cpu():
    import numpy as np
    from ledit_convert.training.fastloop import Arm, ArmConfig, DeviceData
    from ledit_convert.models.dit import LEDiTTransformer2DModel
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    data = DeviceData(images, np.arange(8) % 4, "cpu")
    kinds = set()
    for overrides in replicate.CHECKED_PATHS.values():
        cfg = dict(replicate.MODEL, **replicate.SCALES["smoke"]["model"], **overrides)
        if cfg.get("attention_layout") == "alternate":
            cfg["attention_layout"] = ["self", "causal"] * (cfg["num_layers"] // 2)
        model = LEDiTTransformer2DModel(**cfg)
        kinds.add((model.config.position_encoding, model.config.causal_scan if cfg.get("attention_layout") else None))
        arm = Arm(model, data, ArmConfig(batch=2, lr=1e-3))
        arm.step()
        assert np.isfinite(arm.pop_losses())
    # the arms' paths: the table without masks, is_causal (scan a), the boolean mask of the 2D scans, 2D RoPE
    assert kinds == {("sincos", None), ("none", "one_dimension"), ("none", "mask_lower_right_corner"),
                     ("rope2d", None)}


def test_cpu_evidence_dry_run_writes_curves_and_scores_and_resumes(tmp_path):
    """benchmarks/cpu_evidence.py at smoke scale: held-out loss and probe at every point, sampled scores at the
    scored budget (EMA at 32/48/64, raw at 32) and the base's baselines once (here first, alone); a rerun writes
    nothing new."""
    out = tmp_path / "evidence"
    cmd = [sys.executable, "benchmarks/cpu_evidence.py", "--scale", "smoke", "--features", "pixels", "--out", str(out),
           "--arms", "ledit+fade", "--every", "16", "--score-at", "32", "--final", "32"]

    def run(*extra):
        proc = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return ([json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()],
                [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()])
    baselines = {("dit-extrapolate", "ema", "32"), ("dit-extrapolate", "ema", "48"), ("dit-extrapolate", "ema", "64"),
                 ("dit-interpolate", "ema", "48"), ("dit-interpolate", "ema", "64")}
    curve, rows = run("--baselines-only")  # the base's rows alone, first: the arm's run then skips them
    assert [(r["arm"], r["images"]) for r in curve] == [("base", 0)] and not (out / "arms").exists()
    assert {(r["arm"], r["weights"], r["resolution"]) for r in rows} == baselines
    curve, rows = run()
    assert [(r["arm"], r["images"]) for r in curve[:1]] == [("base", 0)]
    assert [(r["images"], r["weights"]) for r in curve[1:]] == [(i, w) for i in (0, 16, 32) for w in ("ema", "raw")]
    assert all(r["heldout_loss"] > 0 and "probe_col_r2_mid" in r for r in curve)
    scored = {(r["arm"], r["weights"], r["resolution"]) for r in rows}
    assert scored == {("ledit+fade", "ema", "32"), ("ledit+fade", "ema", "48"), ("ledit+fade", "ema", "64"),
                      ("ledit+fade", "raw", "32")} | baselines and len(rows) == len(scored)
    assert (out / "arms" / "ledit+fade-s0" / "models" / "32" / "config.json").exists()
    assert (out / "evidence_heldout.png").exists() and (out / "evidence_single_object.png").exists()
    assert "| 32 | " in (out / "evidence.md").read_text()
    again = run()
    assert (len(again[0]), len(again[1])) == (len(curve), len(rows))
