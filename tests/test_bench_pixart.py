"""benchmarks/bench_pixart_train.py runs end to end at its --smoke size and reports every arm, as rows and as the
summary line. Nothing here asserts a speed: figures come from full-size runs of the same script."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pixart_train.py"
ARMS = ["diffusers", "pixart", "ledit"]


def test_bench_pixart_train_smoke_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arm"] for r in rows] == ARMS
    for r in rows:
        assert r["bench"] == "pixart_train" and r["batch"] == 2 and r["tokens"] == 16 and r["threads"] >= 1
        assert len(r["step_s_all"]) == 3 and all(t > 0 for t in r["step_s_all"])
        assert min(r["step_s_all"]) <= r["step_s"] <= max(r["step_s_all"])
        assert r["images_per_s"] > 0 and r["ratio_vs_diffusers"] > 0 and r["params"] > 0
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["diffusers"]["ratio_vs_diffusers"] == 1.0
    # the same weights and batch: our model with the LEDiT changes off computes diffusers' loss; the LEDiT arm
    # has the extra (zero-initialised) locality conv and no positions, so a different loss
    assert by_arm["pixart"]["params"] == by_arm["diffusers"]["params"] < by_arm["ledit"]["params"]
    assert abs(by_arm["pixart"]["first_loss"] - by_arm["diffusers"]["first_loss"]) <= 1e-5
    assert by_arm["ledit"]["first_loss"] != by_arm["diffusers"]["first_loss"]

    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["bench"] == "pixart_train" and list(summary["rows"]) == ARMS
    assert summary["rows"]["ledit"]["step_s"] == by_arm["ledit"]["step_s"]


def test_bench_pixart_train_in_process_one_arm():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_pixart_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    rows = bench_pixart_train.main(["--smoke", "--arms", "ledit", "--steps", "1", "--warmup", "0"])
    assert len(rows) == 1 and rows[0]["arm"] == "ledit" and rows[0]["step_s"] > 0
    assert rows[0]["ratio_vs_diffusers"] is None and rows[0]["first_loss"] is None  # no baseline, no warm-up
