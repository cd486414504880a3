# bench.py in CI size: every measurement runs, the table prints, the JSON is written, and the CPU baseline (naive
# attention) computes the same function as SDPA, so the ratios compare like with like.
import json

import pytest
import torch
import torch.nn.functional as F

import bench
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
def test_bench_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench.main(["--size=tiny", "--device=cpu", "--dtype=float32", "--loader_workers=(0, 1)",
                             f"--out={out}"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    names = [r["name"] for r in saved["rows"]]
    for prefix in ("finetune step", "pretrain step", "eval encode", "similarity", "data loader", "evaluate()",
                   "tokenizer"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
        assert prefix in text
    assert sum(n.startswith("data loader") for n in names) == 2
    for row in result["rows"]:
        value = next(v for k, v in row["ours"].items() if k in ("videos_per_s", "captions_per_s", "similarity_ms"))
        assert value > 0
        if row["name"].startswith(("finetune", "pretrain", "eval encode")):
            assert row["baseline"] is not None and row["ratio"] > 0  # CPU: baseline measured side by side
        if row["name"].startswith(("finetune", "pretrain")):
            assert row["ours"]["peak_mem_gb"] > 0 and row["ours"]["flops_per_video"] > 0
            assert "mfu" not in row  # no meaningful CPU peak
    evaluated = next(r for r in saved["rows"] if r["name"].startswith("evaluate()"))
    assert "16x16 from LMDB" in evaluated["name"] and evaluated["ours"]["seconds"] > 0  # eval_videos=16 in tiny
    assert saved["setup"]["baseline"].startswith("fp32")
    assert "machine: cpu" in text


def test_bench_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        bench.main(["--size=huge", "--out="])


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
