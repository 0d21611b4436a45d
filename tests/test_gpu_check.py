"""bench/gpu_check.py runs on CPU with tiny configs of the same architectures (the GPU run
uses the same code with the paper's sizes), and prints one table with every stage."""

from __future__ import annotations


def test_gpu_check_runs_on_cpu_with_tiny_models(tmp_path, capsys):
    from bench.gpu_check import main

    records = main(["--device", "cpu", "--tiny", "--threads", "2", "--images", "16", "--caption-images", "8",
                    "--max-new-tokens", "4", "--min-seconds", "0.1", "--work", str(tmp_path),
                    "--json", str(tmp_path / "check.jsonl")])
    assert [r["stage"] for r in records] == ["embed", "mask", "caption"]
    for r in records:
        for key in ("model_ips", "stage_ips", "serial_ips", "zero_ips", "plain_ips"):
            assert r[key] > 0, (r["stage"], key)
    assert records[1]["precision"].endswith("CPU provider")
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "stage_ips" in out and "BLIP-2 tiny" in out
    assert len((tmp_path / "check.jsonl").read_text().splitlines()) == 3
