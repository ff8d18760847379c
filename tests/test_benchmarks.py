"""The benchmark scripts run end to end at a tiny size and report every field the README's table uses.

Nothing here asserts a speed: figures come from full-size runs of the same scripts."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def last_json(args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_bench_train_reports_every_arm():
    out = last_json([BENCH / "bench_train.py", "--variant", "S", "--latent", "8", "--batch", "2", "--steps", "1",
                     "--warmup", "1"])
    assert set(out["rows"]) == {"diffusers", "dit", "ledit", "rope"}
    for row in out["rows"].values():
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["ratio_vs_diffusers"] > 0
        assert row["ratio_vs_ledit"] > 0
        assert row["peak_mem_gib"] > 0.1  # a child process's peak RSS on the CPU: torch alone is more
    assert out["rows"]["diffusers"]["ratio_vs_diffusers"] == 1.0


def test_bench_sampling_reports_the_target_ratios():
    out = last_json([BENCH / "bench_sampling.py", "--hidden", "32", "--layers", "2", "--heads", "2", "--steps", "1",
                     "--batch", "1", "--repeats", "1", "--sample-size", "8", "--device", "cpu"])
    rows = {r["row"]: r for r in out["results"]}
    for size in ("1x", "2x (1:2)", "4x"):
        assert f"ours + LEDiT {size}" in rows and f"ours + stock DiT {size}" in rows
    assert rows["ours + LEDiT 4x"]["tokens"] == 4 * rows["ours + LEDiT 1x"]["tokens"]
    assert set(out["ratios"]) == {"ledit_4x_vs_stock_4x", "causal_vs_self_4x", "ledit_1x_vs_diffusers"}
    assert all(v > 0 for v in out["ratios"].values())


def test_bench_fastloop_reports_the_peer_and_every_eager_row():
    out = last_json([BENCH / "bench_fastloop.py", "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "1",
                     "--arms", "2", "--items", "16", "--hidden", "32", "--layers", "2"])
    assert set(out["images_per_s"]) == {"finetune (peer)", "one_eager", "concurrent_eager"}  # graphed: CUDA only
    assert all(v > 0 for v in out["images_per_s"].values()) and out["ratio_vs_finetune"]["finetune (peer)"] == 1.0


def test_early_recovery_scores_every_arm_at_every_point(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "early_recovery.py"), "--images", "32", "--every", "16",
                           "--arms", "ledit@old,ledit+norm", "--train-items", "32", "--heldout-items", "8",
                           "--probe-images", "8", "--batch", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["images"]) for r in rows] == [(a, i) for i in (0, 16, 32) for a in ("ledit@old", "ledit+norm")]
    for r in rows:
        assert r["heldout_loss_ema"] > 0 and r["heldout_loss_raw"] > 0 and -1.5 < r["probe_row_mid"] <= 1.0
    first = {r["arm"]: r for r in rows if r["images"] == 0}
    assert first["ledit@old"]["heldout_loss_ema"] == first["ledit@old"]["heldout_loss_raw"]  # EMA starts as a copy


def test_bench_buckets_reports_both_rates_their_ratio_and_the_samplers_cost():
    out = last_json([BENCH / "bench_buckets.py", "--batch", "2", "--hidden", "32", "--layers", "2", "--heads", "2",
                     "--images", "6", "--steps", "1", "--warmup", "1", "--rounds", "1"])
    assert out["square_images_per_s"] > 0 and out["bucketed_images_per_s"] > 0 and out["ratio"] > 0
    assert len(out["rounds"]["square"]) == len(out["rounds"]["buckets"]) == 1
    assert out["sampler_us_per_step"]["bucketed"] > 0 and out["sampler_us_per_step"]["plain"] > 0
