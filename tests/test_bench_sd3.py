"""benchmarks/bench_sd3_train.py runs end to end at its --smoke size and reports every arm, as rows and as the
summary line. Nothing here asserts a speed: figures come from full-size runs of the same script."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sd3_train.py"
ARMS = ["diffusers", "sd3", "ledit"]


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_sd3_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_sd3_train


def _check_rows(rows, steps):
    assert [r["arm"] for r in rows] == ARMS
    for r in rows:
        assert r["bench"] == "sd3_train" and r["batch"] == 2 and r["tokens"] == 16 and r["threads"] >= 1
        assert r["text_tokens"] == 5
        assert len(r["step_s_all"]) == steps and all(t > 0 for t in r["step_s_all"])
        assert min(r["step_s_all"]) <= r["step_s"] <= max(r["step_s_all"])
        assert r["images_per_s"] > 0 and r["ratio_vs_diffusers"] > 0 and r["params"] > 0
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["diffusers"]["ratio_vs_diffusers"] == 1.0
    # the same weights and the same flow-loss draws: our model in stock mode computes diffusers' loss; the LEDiT
    # arm has the extra (zero-initialised) locality conv, no table and causal blocks, so a different loss
    assert by_arm["sd3"]["params"] == by_arm["diffusers"]["params"] < by_arm["ledit"]["params"]
    assert abs(by_arm["sd3"]["first_loss"] - by_arm["diffusers"]["first_loss"]) <= 1e-5
    assert by_arm["ledit"]["first_loss"] != by_arm["diffusers"]["first_loss"]
    return by_arm


def test_bench_sd3_train_smoke_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_arm = _check_rows(rows, 3)
    assert all(r["dual"] == 0 and r["qk_norm"] is None and r["loss"] == "flow" for r in rows)

    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["bench"] == "sd3_train" and list(summary["rows"]) == ARMS
    assert summary["rows"]["ledit"]["step_s"] == by_arm["ledit"]["step_s"]
    assert summary["rows"]["sd3"]["first_loss"] == by_arm["sd3"]["first_loss"]


def test_bench_sd3_train_in_process_dual_attention():
    # SD3.5-style: dual-attention blocks get RMS-normalised q/k by default; (a) and (b) still agree
    rows = _bench().main(["--smoke", "--dual", "1", "--steps", "1"])
    _check_rows(rows, 1)
    assert all(r["dual"] == 1 and r["qk_norm"] == "rms_norm" for r in rows)


def test_bench_sd3_train_in_process_one_arm():
    rows = _bench().main(["--smoke", "--arms", "ledit", "--steps", "1", "--warmup", "0", "--loss", "mse"])
    assert len(rows) == 1 and rows[0]["arm"] == "ledit" and rows[0]["step_s"] > 0
    assert rows[0]["ratio_vs_diffusers"] is None and rows[0]["first_loss"] is None  # no baseline, no warm-up


def test_bench_sd3_ledit_state_is_surgery_shaped():
    # (c) loads strictly: (a)'s tensors minus the stored table, plus a zero locality conv
    bench = _bench()
    args = bench.parse_args(["--smoke"])
    cfg = bench.sd3_config(args)
    from diffusers import SD3Transformer2DModel
    reference = SD3Transformer2DModel(**cfg).state_dict()
    model = bench.build("ledit", cfg, reference)
    state = model.state_dict()
    assert "pos_embed.pos_embed" in reference and "pos_embed.pos_embed" not in state
    assert set(state) - set(reference) == {"locality_conv.conv.weight", "locality_conv.conv.bias"}
    assert all(not v.any() for k, v in state.items() if k.startswith("locality_conv."))
    assert all(state[k].equal(v) for k, v in reference.items() if k in state)
