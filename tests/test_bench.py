# bench.py in CI size: every measurement runs, the table prints, the JSON is written, and the CPU baseline (naive
# attention) computes the same function as SDPA, so the ratios compare like with like.
import json

import pytest
import torch
import torch.nn.functional as F

import bench
import configurator
import towers


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_equals_sdpa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(bench.naive_attention(q, k, v, is_causal=causal), want, rtol=1e-5, atol=1e-5)
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask.fill_diagonal_(True)
    torch.testing.assert_close(bench.naive_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_plain_attention_swaps_and_restores():
    sdpa = F.scaled_dot_product_attention
    with bench.plain_attention():
        assert F.scaled_dot_product_attention is bench.naive_attention
    assert F.scaled_dot_product_attention is sdpa
    with pytest.raises(RuntimeError):
        with bench.plain_attention():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is sdpa


@pytest.mark.slow
def test_bench_tiny_cpu(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    try:
        # no --size: without a GPU that is the CPU size; --steps=3 beats its preset of 4
        result = bench.main(["--device=cpu", "--dtype=float32", "--recipe_workers=1", "--ratio_repeats=2",
                             "--steps=3", f"--out={out}"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    names = [r["name"] for r in saved["rows"]]
    for prefix in ("finetune step", "pretrain step", "search query", "loader finetune 224px", "loader pretrain 360px"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
        assert prefix in text
    assert sum(n.startswith("loader") for n in names) == len(bench.RECIPE_PATHS)
    assert "search query tiny, 64 videos x 4" in names  # search_videos=(64,) in tiny
    for row in result["rows"]:
        value = next(v for k, v in row["ours"].items() if k in bench.UNITS)
        assert value > 0
        if row["name"].startswith(("finetune", "pretrain")):
            assert row["baseline"] is not None and row["ratio"] > 0  # CPU: baseline measured side by side
            assert row["pairs"] == 3 * 2 and isinstance(row["noisy"], bool)  # steps=3, ratio_repeats=2
            lo, hi = row["ratio_p25"], row["ratio_p75"]  # NOISY says the middle half spreads by over 25%
            assert 0 < lo <= row["ratio"] <= hi and row["noisy"] is ((hi - lo) > 0.25 * row["ratio"])
            assert f"ours/baseline {row['ratio']:.2f} [{row['ratio_p25']:.2f}-{row['ratio_p75']:.2f}]" in text
        if row["name"].startswith(("finetune", "pretrain")):
            assert row["ours"]["peak_mem_gb"] > 0 and row["ours"]["flops_per_video"] > 0
            assert "mfu" not in row  # no meaningful CPU peak
    assert saved["setup"]["baseline"].startswith("fp32")
    assert "machine: cpu" in text and "bench: size=tiny device=cpu" in text
    assert "1 thread(s)" in saved["setup"]["device"]  # one thread, as train.py, not the two it was given
    assert all(text.count(name) == 1 for name in names)  # the table is printed once
    assert text.count("ours/baseline: our speed over the baseline's") == 1
    assert saved["setup"]["config"]["size"] == "tiny"


def test_bench_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be 'full' or 'tiny', got 'huge'"):
        bench.main(["--size=huge", "--out="])
    assert bench.size == ("full" if torch.cuda.is_available() else "tiny")  # the default follows the device


def test_ratio_summary_flags_a_wide_spread():
    steady = bench.ratio_summary([1.0, 1.1, 0.9], noisy_spread=0.25)
    assert steady == {"ratio": 1.0, "ratio_p25": 0.95, "ratio_p75": pytest.approx(1.05), "pairs": 3, "noisy": False}
    busy = bench.ratio_summary([69.5, 1.0, 0.18], noisy_spread=0.25)  # what a loaded machine once reported
    assert busy["ratio"] == 1.0 and busy["noisy"]
    assert not bench.ratio_summary([1.2, 1.2], 0.25)["noisy"] and bench.ratio_summary([1.0, 2.0], 0.25)["noisy"]
    row = {"name": "finetune step tiny B=4", "ours": {"videos_per_s": 50.0}, "baseline": {"videos_per_s": 50.0},
           **busy}
    assert bench._format_row(row).endswith("baseline 50.0 videos/s, ours/baseline 1.00 [0.59-35.25] NOISY")
    oom = {"name": "finetune step ViT-B/16 B=512", "ours": {"videos_per_s": 0.0, "oom": True}, "baseline": None}
    assert bench._format_row(oom).endswith("0.0 videos/s   out of memory")


def fake_steps(monkeypatch, load):
    """A step factory whose steps advance a fake clock: ours by 1 unit, the baseline's by 3, times load(call)."""
    clock, calls = [0.0], []
    monkeypatch.setattr(bench, "_clock", lambda: clock[0])

    def make(B, dev, dt, compile_):
        def step():
            base = F.scaled_dot_product_attention is bench.naive_attention
            calls.append("base" if base else "ours")
            clock[0] += (3.0 if base else 1.0) * load(len(calls))
        return step, {"flops_per_video": 7.0}
    return make, calls


def test_ratios_come_from_alternating_pairs_of_steps(monkeypatch):
    make, calls = fake_steps(monkeypatch, load=lambda n: 1.0 + (n - 1) // 2)  # grows pair by pair
    ours, base, ratios = bench.time_steps(make, 4, dev="cpu", dt="bfloat16", n_steps=3, n_warmup=1, repeats=2,
                                          baseline=True, compile_=False)
    assert calls == ["ours", "base"] + ["ours", "base", "base", "ours"] * 3  # warm-ups, then alternating pairs
    assert ratios == pytest.approx([3.0] * 6)  # each pair sees one load, so the ratio is the true one
    assert bench.ratio_summary(ratios, 0.25) == {"ratio": pytest.approx(3.0), "ratio_p25": pytest.approx(3.0),
                                                 "ratio_p75": pytest.approx(3.0), "pairs": 6, "noisy": False}
    assert ours["flops_per_video"] == 7.0 and ours["videos_per_s"] > base["videos_per_s"]


def test_load_changing_within_pairs_is_flagged(monkeypatch):
    make, _ = fake_steps(monkeypatch, load=lambda n: 4.0 if n % 3 == 0 else 1.0)
    ratios = bench.time_steps(make, 4, dev="cpu", dt="bfloat16", n_steps=4, n_warmup=1, repeats=2, baseline=True,
                              compile_=False)[2]
    summary = bench.ratio_summary(ratios, 0.25)
    assert summary["noisy"] and summary["ratio_p25"] < 3.0 < summary["ratio_p75"]


def test_every_setting_has_a_description():
    # `python bench.py --help` prints the comment beside each setting
    descriptions = configurator.describe(bench.__file__)
    assert [k for k in bench.config_keys if not descriptions.get(k)] == []


def test_baseline_reaches_the_model(monkeypatch):
    # the swap must take effect inside the towers' attention, or the "baseline" would be our own code again
    calls, naive = [], bench.naive_attention

    def counting(*args, **kw):
        calls.append(1)
        return naive(*args, **kw)

    monkeypatch.setattr(bench, "naive_attention", counting)
    attn = towers.Attention(16, 2)
    x = torch.randn(2, 5, 16)
    want = attn(x, is_causal=True)
    with bench.plain_attention():
        got = attn(x, is_causal=True)
    assert calls, "towers.Attention did not go through the swapped attention"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
